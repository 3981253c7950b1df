r"""The on-disk format of a collection index (INDEX_DIR), read and written only through this module.

  INDEX_DIR/
    manifest.json             what the index is (below); status 'building', then 'complete'
    plans/plan-GGGGG.json     generation G: {"generation", "part_size", "files": [relative paths,
                              sorted]}; part c holds files[c * part_size : (c + 1) * part_size]
    parts/gGGGGG-pCCCCCC.npy          descriptors (n_ok, D), float32 or float16, L2-normalised,
                                      one row per indexed file of the part, in plan order
    parts/gGGGGG-pCCCCCC.skipped.csv  path,reason of the part's files that were not indexed
    parts/gGGGGG-pCCCCCC.csv          path,height,width,bytes,sha1 of the indexed files (the rows
                                      of the .npy), written LAST: a part exists when this file does
    skipped.csv               path,reason of every skipped file (all parts; rewritten at the end)
    faiss.index               the search structure over all rows (dolg_jax.collection.faiss_index)
    rows.arrow                the part CSVs' rows as one Arrow table (derived: collection.columns)

Every file is written under a temporary name and renamed. Rows are the parts in (generation, part)
order (a later generation appends rows). `path` is relative to `images_root`, '/' separators, bytes
that are not UTF-8 written as \xNN in the CSVs (`files.escape`; plans hold them exactly); height and
width are the decoded (EXIF-oriented) image's, sha1 the file's. manifest.json: {"format":
"dolg_jax.collection", "version": 1, "status", "created", "updated", "fingerprint" (model_key,
architecture, extraction, decoder, descriptor_dtype), "model" (source, checkpoint, workdir, config),
"images_root", "protocol", "versions", "counts" (found, indexed, skipped, parts, generations),
"dim", "faiss", "last_run", "checksums" ({relative path: {"bytes", "sha256"}})}. Errors:
`NotAnIndexError`, `DamagedIndexError` (names the file and the fix), `IndexMismatchError`.
Design notes: docs/design_notes.md.
"""

from __future__ import annotations

import csv
import hashlib
import contextlib
import glob
import io
import json
import os
import re
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from dolg_jax import atomic
from dolg_jax.collection import columns
from dolg_jax.collection import files as files_lib

FORMAT = 'dolg_jax.collection'
VERSION = 1
MANIFEST = 'manifest.json'
SKIPPED = 'skipped.csv'
FAISS_FILE = 'faiss.index'
META_FIELDS = tuple(columns.SCHEMA.names)  # path, height, width, bytes, sha1
JSON_STYLE = {'indent': 1, 'sort_keys': True}  # the manifest's and the plans' (plans are hashed)
_PART_RE = re.compile(r'^g(\d{5})-p(\d{6})\.csv$')


class IndexMismatchError(ValueError):
  """The index was built with another model, checkpoint or protocol than this run's."""


class NotAnIndexError(FileNotFoundError):
  """The directory holds no collection index."""


class DamagedIndexError(ValueError):
  """A stored file differs from what the manifest recorded (the message names it and the fix)."""


REPAIR = 'rerun the python -m dolg_jax.index command that built it (it repairs what is damaged)'


UNREPAIRABLE = (
  'restore it from a backup, or move the index aside and index again (it records '
  'what the stored files are; they cannot be verified without it)'
)


def read_json(path: str) -> Any:
  """json.load of `path` (the manifest or a plan); a damaged file raises DamagedIndexError naming
  it."""
  try:
    with open(path, 'rb') as f:
      return json.loads(f.read().decode('utf-8'))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DamagedIndexError(f'{path} is damaged (not valid JSON: {e}); {UNREPAIRABLE}') from None


def file_digest(path: str) -> dict:
  """{'bytes', 'sha256'} of a file."""
  with open(path, 'rb') as f:
    h = hashlib.file_digest(f, 'sha256')
  return {'bytes': os.path.getsize(path), 'sha256': h.hexdigest()}


def _csv_bytes(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> bytes:
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator='\n')
  w.writerow(header)
  w.writerows([files_lib.escape(r[0]), *r[1:]] for r in rows)  # the first column is the path
  return buf.getvalue().encode('utf-8')


def _read_csv(path: str) -> list[dict]:
  try:
    with open(path, newline='', encoding='utf-8') as f:
      return list(csv.DictReader(f))
  except (UnicodeDecodeError, csv.Error) as e:
    raise DamagedIndexError(f'{path} is damaged ({e}); {REPAIR}') from None


def long_side_cap_problem(manifest: dict, cap: int) -> Optional[str]:
  """Why the index's descriptors were not extracted with the long-side cap `cap` (this version's
  `extract.long_side_cap` of the index's extraction config), or None when they were. An index that
  records no protocol.long_side_cap predates the cap: it capped long sides at extraction.max_side
  alone (0 = none), which is `cap` only where max_side is set and equal to it."""
  recorded = (manifest.get('protocol') or {}).get('long_side_cap')
  if recorded is not None:
    if recorded == cap:
      return None
    return (
      f'its {MANIFEST} records protocol.long_side_cap={recorded} pixels, this version caps '
      f'long sides at {cap}'
    )
  max_side = ((manifest.get('fingerprint') or {}).get('extraction') or {}).get('max_side') or 0
  if max_side and max_side == cap:
    return None
  return (
    f'its {MANIFEST} records no protocol.long_side_cap (an index from before long sides were '
    f'capped to fit every scale: it capped them at extraction.max_side={max_side}, 0 = none), this '
    f'version caps them at {cap} pixels'
  )


def fingerprint_diff(old: dict, new: dict) -> list[str]:
  """Names (dotted) of the fingerprint entries that differ."""
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k), new.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out += [f'{k}.{x}' for x in fingerprint_diff(a, b)]
    elif a != b:
      out.append(k)
  return out


class IndexStore:
  """One INDEX_DIR (module docstring). Methods that write are process-safe per part."""

  def __init__(self, path: str):
    self.path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    self.parts_dir = os.path.join(self.path, 'parts')
    self.plans_dir = os.path.join(self.path, 'plans')

  # ------------------------------------------------------------------ manifest and plans

  @property
  def manifest_path(self) -> str:
    return os.path.join(self.path, MANIFEST)

  def exists(self) -> bool:
    return os.path.exists(self.manifest_path)

  def manifest(self) -> dict:
    if not self.exists():
      raise NotAnIndexError(
        f'{self.path} holds no collection index (no {MANIFEST}); build one '
        'with python -m dolg_jax.index --images=... --out=...'
      )
    m = read_json(self.manifest_path)
    if not isinstance(m, dict) or m.get('format') != FORMAT:
      raise NotAnIndexError(f'{self.manifest_path} is not a {FORMAT} manifest')
    return m

  def write_manifest(self, manifest: dict) -> None:
    os.makedirs(self.path, exist_ok=True)
    atomic.write_json(self.manifest_path, manifest, **JSON_STYLE)

  def plans(self) -> list[dict]:
    out = []
    for p in sorted(glob.glob(os.path.join(self.plans_dir, 'plan-*.json'))):
      out.append(read_json(p))
    for g, plan in enumerate(out):
      if plan['generation'] != g:
        raise ValueError(f'{self.plans_dir}: plan generations are not 0..{len(out) - 1}')
    return out

  def write_plan(self, files: Sequence[str], part_size: int) -> dict:
    """A new generation holding `files` (sorted) in parts of `part_size`."""
    if part_size < 1:
      raise ValueError(f'part_size must be >= 1; got {part_size}')
    gen = len(self.plans())
    plan = {'generation': gen, 'part_size': int(part_size), 'files': list(files)}
    os.makedirs(self.plans_dir, exist_ok=True)
    atomic.write_json(os.path.join(self.plans_dir, f'plan-{gen:05d}.json'), plan, **JSON_STYLE)
    return plan

  @staticmethod
  def plan_parts(plan: dict) -> list[tuple[int, int, list[str]]]:
    """(generation, part, files) of every part of a plan."""
    files, size = plan['files'], plan['part_size']
    return [
      (plan['generation'], c, files[a : a + size]) for c, a in enumerate(range(0, len(files), size))
    ]

  def all_parts(self) -> list[tuple[int, int, list[str]]]:
    return [p for plan in self.plans() for p in self.plan_parts(plan)]

  # ------------------------------------------------------------------ parts

  def part_base(self, gen: int, part: int) -> str:
    return os.path.join(self.parts_dir, f'g{gen:05d}-p{part:06d}')

  def is_committed(self, gen: int, part: int) -> bool:
    return os.path.exists(self.part_base(gen, part) + '.csv')

  def write_part(
    self,
    gen: int,
    part: int,
    descriptors: np.ndarray,
    rows: Sequence[dict],
    skipped: Sequence[tuple[str, str]],
  ) -> None:
    """Descriptors (n, D) of `rows` (dicts with META_FIELDS) and the part's skipped files."""
    if descriptors.shape[0] != len(rows):
      raise ValueError(f'{descriptors.shape[0]} descriptors for {len(rows)} rows')
    os.makedirs(self.parts_dir, exist_ok=True)
    base = self.part_base(gen, part)
    with atomic.writing(base + '.npy') as f:
      np.save(f, np.ascontiguousarray(descriptors))
    atomic.write_bytes(base + '.skipped.csv', _csv_bytes(('path', 'reason'), skipped))
    atomic.write_bytes(
      base + '.csv', _csv_bytes(META_FIELDS, ([r[k] for k in META_FIELDS] for r in rows))
    )

  def part_files(self, gen: int, part: int) -> list[str]:
    """The part's files relative to the index directory, the commit marker (.csv) last."""
    name = os.path.basename(self.part_base(gen, part))
    return [f'parts/{name}{ext}' for ext in ('.npy', '.skipped.csv', '.csv')]

  def remove_part(self, gen: int, part: int) -> None:
    """Uncommits a part (its .csv first) so that the next run extracts it again."""
    for rel in reversed(self.part_files(gen, part)):
      with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(self.path, rel))

  def part_problem(self, gen: int, part: int, recorded: Optional[dict] = None) -> Optional[str]:
    """Why a committed part cannot be used, or None: its sha256 against `recorded` (the manifest's
    checksums) where it has the part's files, else its structure (files there, rows =
    descriptors)."""
    files = self.part_files(gen, part)
    for rel in files:
      if not os.path.isfile(os.path.join(self.path, rel)):
        return f'{rel} is missing'
    if recorded is not None and all(rel in recorded for rel in files):
      for rel in files:
        if file_digest(os.path.join(self.path, rel)) != recorded[rel]:
          return f'{rel} differs from its checksum in {MANIFEST}'
      return None
    try:
      rows = self.part_rows(gen, part)
      self.part_skipped(gen, part)
      d = self.part_descriptors(gen, part)
    except (DamagedIndexError, ValueError, OSError) as e:
      return f'{files[0]} or its tables cannot be read ({e})'
    if d.shape[0] != len(rows) or d.ndim != 2:
      return f'{files[0]} holds {d.shape[0]} descriptors for {len(rows)} rows'
    return None

  def part_checksums(self, parts: Sequence[tuple[int, int]], known: Optional[dict] = None) -> dict:
    """{relative path: {'bytes', 'sha256'}} of the parts' files; entries of `known` (digests this
    run made or verified) are taken as they are, the others read and hashed."""
    known = known or {}
    return {
      rel: known.get(rel) or file_digest(os.path.join(self.path, rel))
      for g, p in parts
      for rel in self.part_files(g, p)
    }

  def checksums(self, parts: Sequence[tuple[int, int]], known: Optional[dict] = None) -> dict:
    """`part_checksums` plus the plans, skipped.csv and faiss.index (the manifest's 'checksums');
    parts and plans in `known` are taken from it, skipped.csv and faiss.index always hashed."""
    known = known or {}
    out = self.part_checksums(parts, known)
    for name in sorted(os.listdir(self.plans_dir)) if os.path.isdir(self.plans_dir) else []:
      if name.startswith('plan-') and name.endswith('.json'):
        rel = f'plans/{name}'
        out[rel] = known.get(rel) or file_digest(os.path.join(self.plans_dir, name))
    for name in (SKIPPED, FAISS_FILE):
      if os.path.exists(os.path.join(self.path, name)):
        out[name] = file_digest(os.path.join(self.path, name))
    return out

  def verify_for_search(self, manifest: dict, faiss: bool = True) -> None:
    """Sizes of every recorded file, the set of parts, and (`faiss`) faiss.index's sha256 (module
    docstring); raises DamagedIndexError naming the first damaged file and the fix. A reader that
    loads faiss.index passes faiss=False and reads it with `read_faiss` (read once, hashed)."""
    recorded = manifest.get('checksums')
    if recorded is None:
      return  # an index written before checksums were recorded
    for rel, want in sorted(recorded.items()):
      path = os.path.join(self.path, rel)
      if not os.path.isfile(path):
        raise DamagedIndexError(f'{path} is missing; {REPAIR}')
      size = os.path.getsize(path)
      if size != want['bytes']:
        raise DamagedIndexError(
          f'{path} is damaged ({size} bytes; {MANIFEST} recorded {want["bytes"]}); {REPAIR}'
        )
    parts = {f for g, p in self.committed_parts() for f in self.part_files(g, p)}
    extra = sorted(parts - set(recorded))
    if extra:
      raise DamagedIndexError(
        f'{os.path.join(self.path, extra[0])} is not in {MANIFEST} (an unfinished run?); {REPAIR}'
      )
    if faiss and FAISS_FILE in recorded and file_digest(self.faiss_path) != recorded[FAISS_FILE]:
      raise self._faiss_damaged()

  def _faiss_damaged(self) -> DamagedIndexError:
    return DamagedIndexError(
      f'{self.faiss_path} is damaged (its sha256 differs from {MANIFEST}); {REPAIR}'
    )

  def read_faiss(self, recorded: Optional[dict]) -> bytes:
    """faiss.index's bytes, read once and checked against its sha256 in `recorded` (the
    manifest's checksums; not checked where they do not hold it: an index from before
    checksums); raises DamagedIndexError (missing, or differs)."""
    try:
      with open(self.faiss_path, 'rb') as f:
        data = f.read()
    except FileNotFoundError:
      raise DamagedIndexError(f'{self.faiss_path} is missing; {REPAIR}') from None
    want = (recorded or {}).get(FAISS_FILE)
    if want is not None and want != {
      'bytes': len(data),
      'sha256': hashlib.sha256(data).hexdigest(),
    }:
      raise self._faiss_damaged()
    return data

  def committed_parts(self) -> list[tuple[int, int]]:
    """(generation, part) of the parts on disk, in row order."""
    if not os.path.isdir(self.parts_dir):
      return []
    out = []
    for name in os.listdir(self.parts_dir):
      m = _PART_RE.match(name)
      if m:
        out.append((int(m.group(1)), int(m.group(2))))
    return sorted(out)

  def part_rows(self, gen: int, part: int) -> list[dict]:
    return _read_csv(self.part_base(gen, part) + '.csv')

  def part_skipped(self, gen: int, part: int) -> list[dict]:
    return _read_csv(self.part_base(gen, part) + '.skipped.csv')

  def part_descriptors(self, gen: int, part: int, mmap: bool = True) -> np.ndarray:
    path = self.part_base(gen, part) + '.npy'
    try:
      return np.load(path, mmap_mode='r' if mmap else None)
    except (ValueError, EOFError, OSError) as e:
      if isinstance(e, FileNotFoundError):
        raise DamagedIndexError(f'{path} is missing; {REPAIR}') from None
      raise DamagedIndexError(f'{path} is damaged ({e}); {REPAIR}') from None

  def write_skipped(self, skipped: Iterable[tuple[str, str]]) -> None:
    atomic.write_bytes(os.path.join(self.path, SKIPPED), _csv_bytes(('path', 'reason'), skipped))

  def read_skipped(self) -> list[dict]:
    path = os.path.join(self.path, SKIPPED)
    return _read_csv(path) if os.path.exists(path) else []

  @property
  def faiss_path(self) -> str:
    return os.path.join(self.path, FAISS_FILE)


class Rows:
  """All rows of an index, in row order: paths, metadata and descriptor segments (memory-mapped).

  `paths` and `meta` are sequences over `columns.row_table`; raises DamagedIndexError.
  """

  def __init__(self, store: IndexStore, parts: Optional[Sequence[tuple[int, int]]] = None):
    self.store = store
    self.parts = list(store.committed_parts() if parts is None else parts)
    self.segments: list[np.ndarray] = []
    try:
      self.table = columns.row_table(store, self.parts)
    except columns.TableError as e:
      raise DamagedIndexError(f'{e}; {REPAIR}') from None
    for (g, p), count in zip(self.parts, self.table.part_counts):
      d = store.part_descriptors(g, p)
      if d.shape[0] != count:
        raise DamagedIndexError(
          f'{store.part_base(g, p)}.npy holds {d.shape[0]} descriptors for {count} rows; {REPAIR}'
        )
      if d.shape[0]:
        self.segments.append(d)
    sizes = [s.shape[0] for s in self.segments]
    self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    self.meta = self.table.meta
    self.paths = self.table.paths

  def __len__(self) -> int:
    return len(self.table)

  @property
  def dim(self) -> int:
    return int(self.segments[0].shape[1]) if self.segments else 0

  def take(self, ids: np.ndarray) -> np.ndarray:
    """Descriptors (..., D) float32 of row ids (any int shape)."""
    ids = np.asarray(ids, np.int64)
    flat = ids.reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
      raise ValueError(f'row ids must be in [0, {len(self)})')
    out = np.empty((flat.size, self.dim), np.float32)
    seg = np.searchsorted(self.offsets, flat, side='right') - 1
    order = np.argsort(seg, kind='stable')
    for sel in np.split(order, np.flatnonzero(np.diff(seg[order])) + 1):  # one slice per part
      if sel.size:
        s = seg[sel[0]]
        out[sel] = self.segments[s][flat[sel] - self.offsets[s]]
    if not np.isfinite(out).all():  # damaged in place (same size): never a NaN score
      bad = np.unique(flat[~np.isfinite(out).all(axis=1)])
      raise DamagedIndexError(
        f'{self.store.path}: the stored descriptors of rows '
        f'{bad[:5].tolist()} are not finite (a damaged part); {REPAIR}'
      )
    return out.reshape(ids.shape + (self.dim,))

  def iter_blocks(self, rows: int = 65536):
    """(start, float32 block) over all descriptors, part by part (blocks of at most `rows`)."""
    for s, off in zip(self.segments, self.offsets):
      for a in range(0, s.shape[0], rows):
        yield int(off) + a, np.asarray(s[a : a + rows], np.float32)

  def all_descriptors(self) -> np.ndarray:
    if not self.segments:
      return np.zeros((0, 0), np.float32)
    return np.concatenate([np.asarray(s, np.float32) for s in self.segments])
