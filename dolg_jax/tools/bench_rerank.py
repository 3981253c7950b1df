"""Times SuperGlobal re-ranking on random descriptors: `python -m dolg_jax.tools.bench_rerank`.

  python -m dolg_jax.tools.bench_rerank [--queries=70] [--db=1000000] [--dim=512] [--nofull]

Prints the seconds for the re-ranked top 400 of every query (initial chunked top-k + re-ranking)
and for the full (n_db, n_queries) ranks. See dolg_jax.retrieval.rerank.benchmark.
"""

from absl import app
from absl import flags

from dolg_jax import cli
from dolg_jax.retrieval import rerank

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command-line flags (at entry only, so importing this module defines none)."""
  flags.DEFINE_integer('queries', 70, 'Number of queries.')
  flags.DEFINE_integer('db', 1_000_000, 'Database size (random L2-normalised descriptors).')
  flags.DEFINE_integer('dim', 512, 'Descriptor width.')
  flags.DEFINE_bool('full', True, 'Also time the full (n_db, nq) ranks (the host sort).')


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  for k, v in rerank.benchmark(FLAGS.queries, FLAGS.db, FLAGS.dim, FLAGS.full).items():
    print(f'{k}: {v:.2f}' if isinstance(v, float) else f'{k}: {v}')


def run() -> None:
  define_flags()
  cli.run_app(main)


if __name__ == '__main__':
  run()
