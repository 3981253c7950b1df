"""Search an index of your own images: python -m dolg_jax.search.

  python -m dolg_jax.search --index=INDEX_DIR --query=PATH [--query=PATH ...]
      [--box=TOP,LEFT,HEIGHT,WIDTH] [--k=100] [--rerank=superglobal] [--out=OUT_DIR]
      [--noreport] [--checkpoint=PATH | --workdir=DIR]   # weights, when they moved

Writes OUT_DIR/results.json (default OUT_DIR: INDEX_DIR/search)
  {"index": INDEX_DIR, "queries": [{"query": PATH, "results": [{"path": PATH_AS_INDEXED,
   "score": FLOAT}, ...]}, ...]}
(k results per query, best first, score = cosine similarity) and OUT_DIR/report.html (unless
--noreport). Queries are
described with the model and protocol the index was built with; `--box` crops them (one box for
all, or one per query); `--rerank=superglobal` re-ranks the top M with the stored descriptors.
Calls `dolg_jax.collection.query.search_to_dir`; a failure ends with one line `FAILED: ...` (exit
code 1).
"""

import os

from absl import app
from absl import flags

from dolg_jax import cli
from dolg_jax.collection import files
from dolg_jax.collection import query
from dolg_jax.training import failures

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command-line flags (at entry only, so importing this module defines none)."""
  flags.DEFINE_string('index', None, 'Index directory (python -m dolg_jax.index --out).')
  flags.DEFINE_multi_string('query', [], 'Query image (repeat for several).')
  flags.DEFINE_multi_string(
    'box',
    [],
    'TOP,LEFT,HEIGHT,WIDTH crop of the query in pixels: once for every query, or once per query.',
  )
  flags.DEFINE_integer('k', 100, 'Results per query.')
  flags.DEFINE_enum(
    'rerank',
    '',
    list(query.RERANKERS),
    "'' or 'superglobal' (re-rank the top M with the stored descriptors).",
  )
  flags.DEFINE_string(
    'out', None, 'Where results.json and report.html go (default: INDEX_DIR/search).'
  )
  cli.define_model_flags(
    config=False,
    checkpoint_help='The checkpoint the index was built with, if it moved '
    '(its fingerprint is checked).',
    workdir_help='The same for a training workdir.',
  )
  flags.DEFINE_bool('report', True, 'Write report.html.')


def parse_boxes(boxes: list[str], n: int) -> list:
  if not boxes:
    return [None] * n
  parsed = []
  for b in boxes:
    try:
      vals = [float(v) for v in b.split(',')]
    except ValueError:
      vals = []
    if len(vals) != 4:
      raise app.UsageError(f'--box={b}: expected TOP,LEFT,HEIGHT,WIDTH')
    parsed.append(vals)
  if len(parsed) == 1:
    return parsed * n
  if len(parsed) != n:
    raise app.UsageError(f'{len(parsed)} --box for {n} --query: give one, or one per query')
  return parsed


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS.index:
    raise app.UsageError('--index is required.')
  if not FLAGS.query:
    raise app.UsageError('--query is required (repeat it for several queries).')
  if FLAGS.k < 1:
    raise app.UsageError(f'--k must be >= 1; got {FLAGS.k}')
  boxes = parse_boxes(FLAGS.box, len(FLAGS.query))
  out_dir = FLAGS.out or os.path.join(FLAGS.index, 'search')
  failures.quiet_library_tracebacks()
  out = failures.call_or_exit(
    lambda: query.search_to_dir(
      FLAGS.index,
      FLAGS.query,
      boxes,
      out_dir,
      k=FLAGS.k,
      rerank=FLAGS.rerank,
      checkpoint=FLAGS.checkpoint,
      workdir=FLAGS.workdir,
      report=FLAGS.report,
    ),
    out_dir,
  )
  for q in out['queries']:
    top = q['results'][:3]
    print(
      f'{files.escape(q["query"])}: '
      + (
        ', '.join(f'{files.escape(r["path"])} ({r["score"]:.4f})' for r in top)
        or 'no results (the index is empty)'
      )
      + (' ...' if len(q['results']) > 3 else '')
    )
  print(f'results: {os.path.join(out_dir, "results.json")}')
  if FLAGS.report:
    print(f'report: {os.path.join(out_dir, "report.html")}')


def run() -> None:
  define_flags()
  cli.run_app(main)


if __name__ == '__main__':
  run()
