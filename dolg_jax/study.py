"""Study table over several runs beside the published DOLG numbers: python -m dolg_jax.study.

  python -m dolg_jax.study WORKDIR [WORKDIR ...] [--out=DIR] [--compare_to=auto|ROW_ID]

Each WORKDIR is a training workdir with manifest.json and an evaluation results.json (see
dolg_jax.retrieval.study). Runs that differ only in seed become one row (mean ± std). Prints the
Markdown table and writes DIR/study.md, study.csv, study.png and study.json.
"""

from absl import app
from absl import flags

from dolg_jax import cli
from dolg_jax.retrieval import study

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command-line flags (at entry only, so importing this module defines none)."""
  flags.DEFINE_string('out', 'study', 'Output directory for study.md/.csv/.png/.json.')
  flags.DEFINE_string(
    'compare_to',
    'auto',
    "Published row id to compare every row with (see "
    "dolg_jax/retrieval/published_results.json), or 'auto': the closest protocol of the same "
    'depth and ablation variant.',
  )


def main(argv):
  if len(argv) < 2:
    raise app.UsageError('give one or more run directories: python -m dolg_jax.study WORKDIR...')
  try:
    out = study.write_study(argv[1:], FLAGS.out, compare_to=FLAGS.compare_to)
  except study.StudyError as e:
    raise app.UsageError(str(e)) from e
  print(out['markdown'])
  print('written: ' + ' '.join(out['paths'].values()))


def run() -> None:
  define_flags()
  cli.run_app(main)


if __name__ == '__main__':
  run()
