"""Export the model for serving: python -m dolg_jax.export.

  python -m dolg_jax.export --config=configs/r50.py --checkpoint=PATH --out=EXPORT_DIR
  python -m dolg_jax.export --config=configs/r50.py --workdir=DIR --out=EXPORT_DIR
  [--config.eval.gem_plus_p=4.6 ...]           # evaluation's extraction modules, as in eval

`--checkpoint` / `--workdir` take what `dolg_jax.eval` takes. Writes EXPORT_DIR/model.onnx,
EXPORT_DIR/model.jax_export and EXPORT_DIR/export.json: float32 RGB images (N, H, W, 3) in
[0, 255] (H, W >= 64) -> the (N, D) L2-normalised single-scale descriptor. Both models are checked
against the JAX model before the command ends (worst relative errors printed; above 1e-4 it fails).
Calls `dolg_jax.retrieval.export.run` (the contract); a failure ends with one line `FAILED: ...`
(exit code 1).
"""

from absl import flags

from dolg_jax import cli
from dolg_jax.retrieval import export as export_lib
from dolg_jax.training import failures

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command-line flags (at entry only, so importing this module defines none)."""
  cli.define_model_flags()
  flags.DEFINE_string('out', None, 'Export directory (model.onnx, model.jax_export, export.json).')


def main(argv):
  config = cli.required_config(argv)
  failures.quiet_library_tracebacks()
  summary = failures.call_or_exit(
    lambda: export_lib.run(
      config, workdir=FLAGS.workdir, checkpoint=FLAGS.checkpoint, out_dir=FLAGS.out
    ),
    FLAGS.out or FLAGS.workdir or FLAGS.checkpoint,
  )
  worst = summary['verification']['worst']
  print(
    f'worst relative error: onnx {worst["onnx"]:.2e}, jax_export {worst["jax_export"]:.2e} '
    f'(tolerance {summary["tolerance"]:g})'
  )
  print(f'exported: {FLAGS.out}')


def run() -> None:
  define_flags()
  cli.run_app(main)


if __name__ == '__main__':
  run()
