"""Revisited Oxford / Paris (+1M) evaluation: python -m dolg_jax.eval.

  python -m dolg_jax.eval --config=configs/r50.py --workdir=DIR          # our latest checkpoint
  python -m dolg_jax.eval --config=configs/r50.py --checkpoint=PATH      # .pyth/.pth, converted
                                                                         # dir, or a step dir
  [--output_dir=DIR] [--config.eval.use_distractors=True] [--config.eval.qe_k=2] ...
  [--config.eval.rerank=superglobal]                 # SuperGlobal re-ranking (M/K/beta fields)
  [--config.eval.gem_plus_p=4.6 --config.eval.regional_gem=True --config.eval.relu_plus=0.014
   --config.eval.scale_pool=max]                     # SuperGlobal's extraction modules
  ["--config.eval.datasets=('roxford5k','gldv2_retrieval')"]  # + GLDv2 mAP@100 / mP@100

Calls `dolg_jax.retrieval.evaluate.run` (the library training also uses) and prints the table and
where results.json and the reports went; a failure ends with one line `FAILED: ...` (exit code 1).
Descriptors are cached in OUTPUT_DIR/cache/ (the extraction modules are part of the key), so a
rerun with other search settings (QE, DBA, distractors, re-ranking) takes seconds.
"""

import os

from absl import flags

from dolg_jax import cli
from dolg_jax.retrieval import evaluate
from dolg_jax.training import failures

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command-line flags (at entry only, so importing this module defines none)."""
  cli.define_model_flags()
  flags.DEFINE_string(
    'output_dir',
    None,
    'Where results.json, reports and the descriptor cache '
    'go (default: config.eval.output_dir, else WORKDIR/eval or '
    '<checkpoint>_eval).',
  )


def main(argv):
  config = cli.required_config(argv)
  cli.enable_compilation_cache(config.eval.xla_cache_dir)  # executables persist across evaluations
  failures.quiet_library_tracebacks()
  out = failures.call_or_exit(
    lambda: evaluate.run(
      config, workdir=FLAGS.workdir, checkpoint=FLAGS.checkpoint, output_dir=FLAGS.output_dir
    ),
    FLAGS.output_dir or FLAGS.workdir or FLAGS.checkpoint,
  )
  print(out['table'])
  print(f'results: {os.path.join(out["output_dir"], "results.json")}')
  for name, (html_path, png) in out['reports'].items():
    print(f'report {name}: {html_path} {png}')


def run() -> None:
  define_flags()
  cli.run_app(main)


if __name__ == '__main__':
  run()
