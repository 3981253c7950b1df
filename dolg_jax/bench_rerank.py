"""Times SuperGlobal re-ranking on random descriptors: `python -m dolg_jax.bench_rerank`.

Prints the seconds for the re-ranked top 400 of every query (initial chunked top-k + re-ranking)
and for the full (n_db, n_queries) ranks. See dolg_jax.retrieval.rerank.benchmark.
"""

from absl import app
from absl import flags

from dolg_jax.retrieval import rerank

_NQ = flags.DEFINE_integer('queries', 70, 'Number of queries.')
_NDB = flags.DEFINE_integer('db', 1_000_000, 'Database size (random L2-normalised descriptors).')
_DIM = flags.DEFINE_integer('dim', 512, 'Descriptor width.')
_FULL = flags.DEFINE_bool('full', True, 'Also time the full (n_db, nq) ranks (the host sort).')


def main(argv):
  del argv
  for k, v in rerank.benchmark(_NQ.value, _NDB.value, _DIM.value, _FULL.value).items():
    print(f'{k}: {v:.2f}' if isinstance(v, float) else f'{k}: {v}')


if __name__ == '__main__':
  app.run(main)
