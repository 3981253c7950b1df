"""Index a collection of images: `build(config, workdir=|checkpoint=, images=, out=, options=)`.

The library behind `python -m dolg_jax.index` (format: collection.store). Lists the images
(`files.list_images`), loads the model as evaluation does (`evaluate.load_model`), extracts every
part not yet stored (parts shared over processes), then process 0 writes skipped.csv, the FAISS
structure with its recall@k and the manifest (status 'complete', found = indexed + skipped), which
`build` returns. Unreadable files are skipped with a reason; a rerun resumes and repairs damaged
parts and structures. Raises ValueError (`Options.check`), `store.IndexMismatchError` (an index
with another fingerprint or images root; `options.replace` moves it to
INDEX_DIR.replaced-<old model key>), `store.DamagedIndexError` (a damaged plan), RuntimeError
(parts still missing: another process failed). Design notes: docs/design_notes.md.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
import time
from typing import Any, Callable, Optional

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from dolg_jax import models
from dolg_jax import progress as progress_lib
from dolg_jax import versions
from dolg_jax.collection import faiss_index
from dolg_jax.collection import files as files_lib
from dolg_jax.collection import reading
from dolg_jax.collection import store as store_lib
from dolg_jax.retrieval import descriptor_cache
from dolg_jax.retrieval import evaluate
from dolg_jax.retrieval import extract as extract_lib

DECODER = 'data.decode.decode_rgb (cv2.imread-exact, EXIF orientation; JPEGs checked strictly)'
DESCRIPTOR_DTYPES = ('float32', 'float16')
_PACKAGES = (
  'jax',
  'jaxlib',
  'flax',
  'numpy',
  'opencv-python-headless',
  'pillow',
  'simplejpeg',
  'faiss-cpu',
  'faiss-gpu',
)


@dataclasses.dataclass(frozen=True)
class Options:
  """How to build (the index command's flags)."""

  part_size: int  # files per part (the unit of resumption and of work sharing)
  descriptor_dtype: str  # 'float32' | 'float16' (stored descriptors)
  faiss: faiss_index.Spec  # the search structure
  replace: bool  # a changed model/protocol: move the old index aside, start anew
  read_workers: int  # threads reading + decoding files
  recall_k: int  # recall@k measured at build time ...
  recall_sample: int  # ... over this many stored descriptors as queries
  progress: bool = True  # print a progress line (process 0)
  limits: reading.Limits = reading.Limits()  # what one file may cost (pixels, bytes)

  def check(self) -> None:
    """Raises ValueError naming the first bad option (before anything is read or written)."""
    if self.part_size < 1:
      raise ValueError(f'--part_size must be >= 1; got {self.part_size}')
    if self.descriptor_dtype not in DESCRIPTOR_DTYPES:
      raise ValueError(
        f'--descriptor_dtype must be one of {DESCRIPTOR_DTYPES}; got {self.descriptor_dtype!r}'
      )
    if self.read_workers < 0:
      raise ValueError(f'--read_workers must be >= 0; got {self.read_workers}')
    if self.recall_k < 1 or self.recall_sample < 0:
      raise ValueError(
        f'--recall_k must be >= 1 and --recall_sample >= 0; got '
        f'{self.recall_k}, {self.recall_sample}'
      )
    self.limits.check()
    faiss_index.resolve(self.faiss, 1, 8)  # the kind and its parameters


# ----------------------------------------------------------------------------- helpers


def fingerprint(
  config: ml_collections.ConfigDict,
  apply_fn: Callable,
  variables: Any,
  cfg: extract_lib.ExtractConfig,
  descriptor_dtype: str,
) -> dict:
  """Everything the stored descriptors depend on (compared on every run)."""
  return {
    'model_key': descriptor_cache.model_key(
      variables, evaluate.eval_dtype(config), evaluate.model_overrides(config)
    ),
    'architecture': models.architecture_record(apply_fn.model),  # what the hash does not say
    'extraction': json.loads(json.dumps(cfg.key())),
    'decoder': DECODER,
    'descriptor_dtype': descriptor_dtype,
  }


def read_image(
  root: str, rel: str, limits: reading.Limits = reading.Limits()
) -> tuple[Optional[dict], Any]:
  """(metadata row, uint8 RGB image) of one file, or (None, reason) when it cannot be indexed."""
  got = reading.read_image(files_lib.absolute(root, rel), limits)
  if got.reason is not None:
    return None, got.reason
  return got.row(rel), got.image


INDEX_PROGRESS = (
  'index: {n}/{total} images ({percentage:.1f}%), {rate_noinv:.1f} images/s, ETA {remaining}'
)


def progress_printer(total: int, enabled: bool) -> progress_lib.Printer:
  """'index: 1234/5000 images (24.7%), 35.2 images/s, ETA 01:47' at most every 2 s (stderr)."""
  return progress_lib.Printer(progress_lib.Progress(total, INDEX_PROGRESS), enabled=enabled)


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


# ----------------------------------------------------------------------------- parts


def extract_part(
  extractor: extract_lib.Extractor,
  root: str,
  rel_paths: list[str],
  options: Options,
  progress: progress_lib.Printer,
  dtype: np.dtype,
) -> tuple[np.ndarray, list[dict], list[tuple[str, str]]]:
  """(descriptors (n_ok, D), rows, skipped) of one part's files."""
  skipped: list[tuple[str, str]] = []
  rows: list[dict] = []

  def read(rel):  # capped here (as the extractor would) so that the read-ahead stays small
    row, img = read_image(root, rel, options.limits)
    return (row, img) if row is None else (row, extract_lib.prepare_image(img, None, extractor.cfg))

  def examples():
    images = extract_lib.ordered_map(read, rel_paths, options.read_workers, window=32)
    for rel, (row, img) in zip(rel_paths, images):
      progress.update()
      if row is None:
        skipped.append((rel, img))
        continue
      rows.append(row)
      yield {'index': len(rows) - 1, 'image': img}

  idx, desc = extractor.extract_own(examples(), presharded=True)
  if idx.size:
    if not np.array_equal(idx, np.arange(len(rows))):
      raise AssertionError('descriptors came back out of order')
    desc = desc.astype(dtype)
  else:
    desc = np.zeros((0, 0), dtype)
  return desc, rows, skipped


# ----------------------------------------------------------------------------- build


def _check_existing(
  store: store_lib.IndexStore, fp: dict, cap: int, root: str, replace: bool
) -> bool:
  """True when an existing index must be moved aside (replace); raises on a mismatch otherwise
  (fingerprint, long-side cap `cap`: store.long_side_cap_problem, images root)."""
  if not store.exists():
    return False
  old = store.manifest()
  diff = store_lib.fingerprint_diff(old['fingerprint'], fp)
  cap_problem = store_lib.long_side_cap_problem(old, cap)
  if cap_problem:
    diff.append('protocol.long_side_cap')
  if old.get('images_root') != root:
    diff.append('images_root')
  if not diff:
    return False
  if replace:
    return True
  detail = ', '.join(diff)
  raise store_lib.IndexMismatchError(
    f'{store.path} was built with another {detail} (index: model '
    f'{old["fingerprint"]["model_key"]}, images {old.get("images_root")}; this run: model '
    f'{fp["model_key"]}, images {root}'
    + (f'; {cap_problem}' if cap_problem else '')
    + '); nothing was mixed into it. Pass --replace to move the old index aside and build a new '
    'one, or choose another --out.'
  )


def build(
  config: ml_collections.ConfigDict,
  *,
  workdir: Optional[str] = None,
  checkpoint: Optional[str] = None,
  images: str,
  out: str,
  options: Options,
) -> dict:
  """Indexes `images` into `out` (module docstring); returns the summary (the manifest)."""
  options.check()
  t_start = time.perf_counter()
  pid, nproc = jax.process_index(), jax.process_count()
  store = store_lib.IndexStore(out)
  root, found = files_lib.list_images(images)
  apply_fn, variables, source = evaluate.load_model(config, workdir=workdir, checkpoint=checkpoint)
  cfg = extract_lib.from_config(config.eval)
  fp = fingerprint(config, apply_fn, variables, cfg, options.descriptor_dtype)
  move_aside = _check_existing(store, fp, extract_lib.long_side_cap(cfg), root, options.replace)
  _barrier('collection_checked')
  new_files: list[str] = []
  verified: dict = {}  # part digests checked by repair (process 0)
  if pid == 0:
    if move_aside:
      old_key = store.manifest()['fingerprint']['model_key']
      dest = f'{store.path}.replaced-{old_key}'
      k = 1
      while os.path.exists(dest):
        dest, k = f'{store.path}.replaced-{old_key}-{k}', k + 1
      os.rename(store.path, dest)
      print(f'index: the old index (model {old_key}) moved to {dest}', file=sys.stderr)
    manifest = (
      store.manifest()
      if store.exists()
      else {
        'format': store_lib.FORMAT,
        'version': store_lib.VERSION,
        'created': _now(),
        'fingerprint': fp,
        'images_root': root,
      }
    )
    manifest.update(
      {
        'status': 'building',
        'updated': _now(),
        'versions': versions.package_versions(_PACKAGES),
        'model': {
          'source': source,
          'workdir': os.path.abspath(workdir) if workdir else None,
          'checkpoint': os.path.abspath(checkpoint) if checkpoint else None,
          'config': json.loads(config.to_json()),
        },
        'protocol': protocol(config, cfg, fp, options),
      }
    )
    store.write_manifest(manifest)
    verified = repair(store, manifest)
    planned = {f for plan in store.plans() for f in plan['files']}
    new_files = [f for f in found if f not in planned]
    if new_files:
      store.write_plan(new_files, options.part_size)
  _barrier('collection_planned')
  pending = [p for p in store.all_parts() if not store.is_committed(p[0], p[1])]
  mine = pending[pid::nproc]
  progress = progress_printer(sum(len(p[2]) for p in mine), options.progress and pid == 0)
  extracted = 0
  if mine:
    extractor = extract_lib.Extractor(apply_fn, variables, cfg)
    dtype = np.dtype(options.descriptor_dtype)
    for gen, part, rel_paths in mine:
      desc, rows, skipped = extract_part(extractor, root, rel_paths, options, progress, dtype)
      store.write_part(gen, part, desc, rows, skipped)
      extracted += len(rows)
  t_extract = time.perf_counter() - t_start
  _barrier('collection_extracted')
  summary = {}
  if pid == 0:
    summary = finalize(
      store,
      options,
      {
        'found': len(found),
        'new': len(new_files),
        'extracted_by_process_0': extracted,
        'processes': nproc,
        'extract_seconds': t_extract,
        'images_per_second_process_0': extracted / t_extract if t_extract > 0 else 0.0,
      },
      verified,
    )
  _barrier('collection_finalized')
  if pid != 0:
    summary = store.manifest()
  return summary


def protocol(
  config: ml_collections.ConfigDict, cfg: extract_lib.ExtractConfig, fp: dict, options: Options
) -> dict:
  """The manifest's 'protocol': how descriptors are made (queries follow it); `fp`: this run's
  `fingerprint`, whose extraction, decoder and descriptor dtype it repeats."""
  return {
    'extraction': fp['extraction'],
    'decoder': fp['decoder'],
    'compute_dtype': evaluate.eval_dtype(config),
    'model_overrides': evaluate.model_overrides(config),
    'descriptor_dtype': fp['descriptor_dtype'],
    'long_side_cap': extract_lib.long_side_cap(cfg),
    'max_pixels': options.limits.max_pixels,
    'max_file_mb': options.limits.max_file_mb,
  }


def repair(store: store_lib.IndexStore, manifest: dict) -> dict:
  """Uncommits every damaged or incomplete part (extracted again by this run); returns the
  recorded digests of the plans and part files it verified (finalize does not hash them again)."""
  recorded = manifest.get('checksums')
  verified = {}
  for rel, want in sorted((recorded or {}).items()):
    if rel.startswith('plans/'):
      if store_lib.file_digest(os.path.join(store.path, rel)) != want:
        raise store_lib.DamagedIndexError(
          f'{os.path.join(store.path, rel)} differs from its checksum in {store_lib.MANIFEST} '
          f'(a plan fixes which files form each part); {store_lib.UNREPAIRABLE}'
        )
      verified[rel] = want
  for g, p in store.committed_parts():
    problem = store.part_problem(g, p, recorded)
    if problem:
      store.remove_part(g, p)
      print(
        f'index: repairing {store.path}: {problem}; the part is extracted again', file=sys.stderr
      )
    elif recorded and all(rel in recorded for rel in store.part_files(g, p)):
      verified.update({rel: recorded[rel] for rel in store.part_files(g, p)})
  return verified


def finalize(
  store: store_lib.IndexStore, options: Options, last_run: dict, verified: Optional[dict] = None
) -> dict:
  """Counts, skipped.csv, the FAISS structure and its recall, checksums (`verified`: plan and part
  digests `repair` checked this run), manifest status 'complete'."""
  manifest = store.manifest()
  parts = store.all_parts()
  missing = [(g, p) for g, p, _ in parts if not store.is_committed(g, p)]
  if missing:
    raise RuntimeError(
      f'{store.path}: {len(missing)} parts are missing after extraction (first '
      f'{store.part_base(*missing[0])}): another process failed; rerun the same '
      'command to finish them'
    )
  rows = store_lib.Rows(store, [(g, p) for g, p, _ in parts])
  skipped = [(r['path'], r['reason']) for g, p, _ in parts for r in store.part_skipped(g, p)]
  store.write_skipped(skipped)
  n_files = sum(len(f) for _, _, f in parts)
  counts = {
    'found': n_files,
    'indexed': len(rows),
    'skipped': len(skipped),
    'parts': len(parts),
    'generations': len(store.plans()),
  }
  if counts['found'] != counts['indexed'] + counts['skipped']:
    raise AssertionError(f'counts do not add up: {counts}')
  committed = [(g, p) for g, p, _ in parts]
  old = manifest.get('checksums') or {}
  parts_sums = store.part_checksums(committed, verified)  # hashes only parts new this run
  info = None
  if len(rows):
    info = build_faiss(
      store,
      rows,
      options.faiss,
      manifest.get('faiss'),
      options,
      reusable=_faiss_reusable(store, old, parts_sums),
    )
  # plans: those repair verified as they are; skipped.csv and faiss.index as written now
  sums = store.checksums(committed, {**(verified or {}), **parts_sums})
  manifest.update(
    {
      'status': 'complete',
      'updated': _now(),
      'counts': counts,
      'dim': rows.dim,
      'faiss': info,
      'last_run': last_run,
      'checksums': sums,
    }
  )
  store.write_manifest(manifest)
  return manifest


def _faiss_reusable(store: store_lib.IndexStore, old: dict, sums: dict) -> Optional[bytes]:
  """faiss.index's bytes (read once, for `build_faiss` to load) when it may be extended:
  undamaged (its recorded sha256; an index from before checksums: trusted) and every part it was
  built from unchanged; else None."""
  if not os.path.exists(store.faiss_path):
    return None
  try:
    data = store.read_faiss(old)
  except store_lib.DamagedIndexError:
    print(
      f'index: repairing {store.faiss_path}: it differs from its checksum; rebuilt from the '
      'stored descriptors',
      file=sys.stderr,
    )
    return None
  return data if all(old[rel] == sums.get(rel) for rel in old if rel.startswith('parts/')) else None


def build_faiss(
  store: store_lib.IndexStore,
  rows: store_lib.Rows,
  spec: faiss_index.Spec,
  old: Optional[dict],
  options: Options,
  reusable: Optional[bytes] = None,
) -> dict:
  """Extends the existing structure when it is `reusable` (its bytes: `_faiss_reusable`), has the
  same spec and a prefix of the rows; else builds it anew (a rebuild of the same spec keeps its
  resolved parameters and training sample). Returns the manifest's 'faiss' entry."""
  n, d = len(rows), rows.dim
  t0 = time.perf_counter()
  index = None
  same = bool(old) and old.get('requested') == spec.to_json()
  if same and reusable is not None:
    resolved = faiss_index.Spec(**old['spec'])
    try:
      loaded = faiss_index.deserialize(reusable, resolved)
    except RuntimeError as e:  # unreadable (an index from before checksums): rebuilt
      print(
        f'index: repairing {store.faiss_path}: {str(e).splitlines()[0]}; rebuilt from the '
        'stored descriptors',
        file=sys.stderr,
      )
      loaded = None
    if (
      loaded is not None
      and loaded.ntotal == old.get('ntotal')
      and loaded.ntotal <= n
      and loaded.d == d
    ):
      start = loaded.ntotal
      faiss_index.extend(loaded, ((s, b) for s, b in rows.iter_blocks() if s >= start))
      index, info = loaded, dict(old, ntotal=int(loaded.ntotal), extended_from=int(start))
  if index is None:
    first = (
      faiss_index.Spec(**old['spec']) if same and 0 < old.get('trained_rows', 0) <= n else None
    )
    index, resolved, info = faiss_index.build(
      rows.iter_blocks,
      rows.take,
      n,
      d,
      spec,
      resolved=first,
      trained_rows=old.get('trained_rows') if first else None,
    )
  info['requested'] = spec.to_json()
  info['seconds'] = time.perf_counter() - t0
  info['recall'] = faiss_index.measure_recall(
    index,
    resolved,
    rows.take,
    rows.iter_blocks,
    n,
    k=options.recall_k,
    sample=options.recall_sample,
    seed=resolved.seed,
  )
  faiss_index.save(index, store.faiss_path)
  return info
