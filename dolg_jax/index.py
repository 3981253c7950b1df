"""Index your own images: python -m dolg_jax.index.

  python -m dolg_jax.index --config=CONFIG (--checkpoint=PATH | --workdir=DIR) \
      --images=DIR_OR_LIST --out=INDEX_DIR [--config.x=y ...]
      [--faiss=flat|ivfpq|hnsw] [--descriptor_dtype=float16] [--part_size=4096] [--replace]
  # N processes (each reads only its share of the files and writes its own parts):
  python -m dolg_jax.index ... --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=I

`--images`: a folder (recursive; jpg, jpeg, png, webp, bmp, tif, tiff in any case) or a text file
of paths (relative to its folder). Every file found becomes a row or a line of
INDEX_DIR/skipped.csv with its reason. Rerunning the same command extracts only what is missing
and repairs damaged parts; a changed model, checkpoint or protocol is refused (`--replace` moves
the old index aside). `--checkpoint` / `--workdir` as in dolg_jax.eval; descriptors as
evaluation's (config.eval). Calls `dolg_jax.collection.build.build` (index format:
dolg_jax/collection/store.py); a failure ends with one line `FAILED: ...` (exit code 1).
"""

import json
import os

from absl import app
from absl import flags
import jax

from dolg_jax import cli
from dolg_jax.collection import build as build_lib
from dolg_jax.collection import faiss_index
from dolg_jax.collection import files
from dolg_jax.collection import reading
from dolg_jax.training import failures

FLAGS = flags.FLAGS
_SPEC = faiss_index.Spec()


def define_flags() -> None:
  """Defines the command-line flags (at entry only, so importing this module defines none)."""
  cli.define_model_flags()
  flags.DEFINE_string('images', None, 'Folder of images (recursive) or a list file.')
  flags.DEFINE_string('out', None, 'Index directory (created; rerun to resume or add images).')
  flags.DEFINE_enum(
    'faiss',
    'flat',
    list(faiss_index.KINDS),
    'Search structure: exact inner product, IVF-PQ (+ exact refine) or HNSW.',
  )
  flags.DEFINE_integer('nlist', _SPEC.nlist, 'IVF-PQ inverted lists (0 = automatic).')
  flags.DEFINE_integer('pq_m', _SPEC.pq_m, 'IVF-PQ sub-quantizers (0 = D / 8).')
  flags.DEFINE_integer('pq_bits', _SPEC.pq_bits, 'IVF-PQ bits per code.')
  flags.DEFINE_integer('nprobe', _SPEC.nprobe, 'IVF-PQ lists visited per query.')
  flags.DEFINE_integer(
    'refine',
    _SPEC.refine,
    'IVF-PQ: re-score the top k * refine exactly from the stored descriptors (1 = off).',
  )
  flags.DEFINE_integer('hnsw_m', _SPEC.hnsw_m, 'HNSW links per node.')
  flags.DEFINE_integer('ef_construction', _SPEC.ef_construction, 'HNSW efConstruction.')
  flags.DEFINE_integer('ef_search', _SPEC.ef_search, 'HNSW efSearch.')
  flags.DEFINE_integer('train_size', _SPEC.train_size, 'IVF-PQ training sample (0 = automatic).')
  flags.DEFINE_enum(
    'descriptor_dtype', 'float32', list(build_lib.DESCRIPTOR_DTYPES), 'Stored descriptor dtype.'
  )
  flags.DEFINE_integer('part_size', 4096, 'Files per part (unit of resumption and work sharing).')
  flags.DEFINE_integer('read_workers', 4, 'Threads reading and decoding files.')
  flags.DEFINE_integer(
    'max_pixels',
    reading.MAX_PIXELS,
    'Files with more pixels (by their '
    'header, before decoding) are skipped; queries get the same limit.',
  )
  flags.DEFINE_integer('max_file_mb', reading.MAX_FILE_MB, 'Files larger than this are skipped.')
  flags.DEFINE_integer('recall_k', 100, 'recall@k of the search structure measured at build time.')
  flags.DEFINE_integer('recall_sample', 200, 'Stored descriptors used as queries for recall@k.')
  flags.DEFINE_bool(
    'replace',
    False,
    'Index built with another model/checkpoint/protocol: move '
    'it aside (INDEX_DIR.replaced-<model key>) and build a new one.',
  )
  flags.DEFINE_bool('progress', True, 'Print a progress line (rate, ETA).')
  cli.define_distributed_flags()


def options_from_flags() -> build_lib.Options:
  spec = faiss_index.Spec(
    kind=FLAGS.faiss,
    nlist=FLAGS.nlist,
    pq_m=FLAGS.pq_m,
    pq_bits=FLAGS.pq_bits,
    nprobe=FLAGS.nprobe,
    refine=FLAGS.refine,
    hnsw_m=FLAGS.hnsw_m,
    ef_construction=FLAGS.ef_construction,
    ef_search=FLAGS.ef_search,
    train_size=FLAGS.train_size,
  )
  return build_lib.Options(
    part_size=FLAGS.part_size,
    descriptor_dtype=FLAGS.descriptor_dtype,
    faiss=spec,
    replace=FLAGS.replace,
    read_workers=FLAGS.read_workers,
    recall_k=FLAGS.recall_k,
    recall_sample=FLAGS.recall_sample,
    progress=FLAGS.progress,
    limits=reading.Limits(FLAGS.max_pixels, FLAGS.max_file_mb),
  )


def main(argv):
  config = cli.required_config(argv)
  for name in ('images', 'out'):
    if not FLAGS[name].value:
      raise app.UsageError(f'--{name} is required.')
  cli.enable_compilation_cache(config.eval.xla_cache_dir)  # executables persist across runs
  failures.quiet_library_tracebacks()

  def build() -> dict:
    cli.initialize_distributed_from_flags()
    return build_lib.build(
      config,
      workdir=FLAGS.workdir,
      checkpoint=FLAGS.checkpoint,
      images=FLAGS.images,
      out=FLAGS.out,
      options=options_from_flags(),
    )

  out = failures.call_or_exit(build, FLAGS.out)
  if jax.process_index() == 0:
    c = out['counts']
    run = out.get('last_run', {})
    faiss_info = out.get('faiss') or {}
    recall = faiss_info.get('recall') or {}
    print(
      f'index: {out_path()}: found {c["found"]} files = {c["indexed"]} indexed + '
      f'{c["skipped"]} skipped ({run.get("new", 0)} new this run, '
      f'{run.get("extracted_by_process_0", 0)} extracted by process 0 at '
      f'{run.get("images_per_second_process_0", 0.0):.1f} images/s)'
    )
    if faiss_info:
      print(
        f'faiss: {faiss_info["type"]}, recall@{recall.get("k")} = {recall.get("recall")} '
        f'on {recall.get("queries")} stored descriptors'
      )
    if c['skipped']:
      print(f'skipped: {os.path.join(out_path(), "skipped.csv")}')
    if not c['found']:
      print(
        f'index: no image files under {FLAGS.images} (extensions '
        f'{", ".join(files.IMAGE_EXTENSIONS)}): the index is empty; searches answer 0 results'
      )
    print(json.dumps({'manifest': os.path.join(out_path(), 'manifest.json')}))


def out_path() -> str:
  return os.path.abspath(os.path.expanduser(FLAGS.out))


def run() -> None:
  define_flags()
  cli.run_app(main)


if __name__ == '__main__':
  run()
