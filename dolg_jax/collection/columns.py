r"""The row table of an index, columnar and memory-mapped: `row_table(store, parts) -> RowTable`.

Format: INDEX_DIR/rows.arrow, one Arrow IPC file of one record batch (columns path, height, width,
bytes, sha1, in row order), derived from the part CSVs (store.py), which stay the record. Its schema
metadata holds `dolg_jax.parts` ([generation, part, CSV size, CSV mtime_ns, rows] per part) and
`dolg_jax.escaped` (rows whose CSV path is escaped as \xNN). A table that does not match the parts
asked for is rebuilt from the CSVs and written atomically (kept in memory where the directory is
read-only). `RowTable.paths` / `.meta` are sequences over the columns (`meta[i]` a dict of strings
as csv.DictReader gives; escaped paths map back to the plan's exact names). A missing or unreadable
part CSV raises `TableError`. Design notes: docs/design_notes.md.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import pyarrow as pa
from pyarrow import compute as pc
from pyarrow import csv as pa_csv
from pyarrow import ipc

from dolg_jax import atomic
from dolg_jax.collection import files as files_lib

TABLE_FILE = 'rows.arrow'
KEY = b'dolg_jax.parts'
ESCAPED = b'dolg_jax.escaped'  # rows whose CSV path is escaped (\xNN), found at conversion
SCHEMA = pa.schema(
  [
    ('path', pa.large_string()),
    ('height', pa.int64()),
    ('width', pa.int64()),
    ('bytes', pa.int64()),
    ('sha1', pa.large_string()),
  ]
)


class TableError(ValueError):
  """A part CSV is missing or unreadable (store.Rows names it as a damaged index)."""


def _key(store, parts) -> list:
  out = []
  for g, p in parts:
    path = store.part_base(g, p) + '.csv'
    try:
      st = os.stat(path)
    except FileNotFoundError:
      raise TableError(f'{path} is missing') from None
    out.append([g, p, st.st_size, st.st_mtime_ns])
  return out


def _read_part(store, g: int, p: int) -> pa.Table:
  path = store.part_base(g, p) + '.csv'
  try:
    t = pa_csv.read_csv(
      path,
      parse_options=pa_csv.ParseOptions(newlines_in_values=True),
      convert_options=pa_csv.ConvertOptions(
        column_types={f.name: f.type for f in SCHEMA},
        include_columns=SCHEMA.names,
        strings_can_be_null=False,
      ),
    )
  except (pa.ArrowInvalid, OSError, KeyError) as e:
    if isinstance(e, FileNotFoundError):
      raise TableError(f'{path} is missing') from None
    raise TableError(f'{path} is damaged ({str(e).splitlines()[0]})') from None
  return t.select(SCHEMA.names).cast(SCHEMA)


def _open(path: str, key: list) -> Optional[pa.Table]:
  try:
    reader = ipc.open_file(pa.memory_map(path, 'r'))
  except (OSError, pa.ArrowInvalid):
    return None
  meta = reader.schema.metadata or {}
  if ESCAPED not in meta or reader.num_record_batches > 1:  # an older or chunked table: rebuilt
    return None
  try:
    stored = json.loads(meta.get(KEY, b'null'))
  except ValueError:
    return None
  if (
    not isinstance(stored, list)
    or [k[:4] for k in stored] != key
    or reader.schema.remove_metadata() != SCHEMA
  ):
    return None
  return reader.read_all()


def _write(path: str, table: pa.Table, key: list, escaped: list) -> None:
  schema = SCHEMA.with_metadata(
    {KEY: json.dumps(key).encode(), ESCAPED: json.dumps(escaped).encode()}
  )
  try:
    with atomic.replacing(path) as tmp:
      with pa.OSFile(tmp, 'wb') as f, ipc.new_file(f, schema) as w:
        w.write_table(table.replace_schema_metadata(schema.metadata), max_chunksize=1 << 62)
  except OSError:  # a read-only index: the table stays in memory
    pass


class Column(Sequence):
  """A read-only sequence over one Arrow column (comparable to lists)."""

  def __init__(self, array: pa.Array, overrides: Optional[dict] = None):
    self._a = array
    self._over = overrides or {}

  def __len__(self) -> int:
    return len(self._a)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    i = int(i)
    if i < 0:
      i += len(self)
    if not 0 <= i < len(self):
      raise IndexError(f'row {i} outside [0, {len(self)})')
    if i in self._over:
      return self._over[i]
    return self._a[i].as_py()

  def __iter__(self):
    for i, v in enumerate(self._a.to_pylist()):
      yield self._over.get(i, v)

  def index(self, value, start: int = 0, stop: Optional[int] = None) -> int:
    for i, v in self._over.items():
      if v == value and start <= i < (len(self) if stop is None else stop):
        return i
    j = pc.index(self._a, value, start=start, end=stop).as_py()
    if j < 0:
      raise ValueError(f'{value!r} is not in the index')
    return j

  def __eq__(self, other: Any) -> bool:
    if isinstance(other, (list, tuple, Column)):
      return len(self) == len(other) and list(self) == list(other)
    return NotImplemented

  __hash__ = None

  def __repr__(self) -> str:
    return f'Column({len(self)} rows)'


class Meta(Sequence):
  """Rows as dicts of strings (path exact, numbers as the CSV wrote them), built on access."""

  def __init__(self, table: pa.Table, paths: Column):
    self._t = table
    self._paths = paths

  def __len__(self) -> int:
    return self._t.num_rows

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    i = int(i) + (len(self) if int(i) < 0 else 0)
    row = {name: self._t.column(name)[i].as_py() for name in SCHEMA.names[1:]}
    out = {'path': self._paths[i]}
    out.update({k: str(v) for k, v in row.items()})
    return out


class RowTable:
  """The rows of `parts` (module docstring): `paths`, `meta`, `part_counts`, `table`."""

  def __init__(self, table: pa.Table, part_counts: list[int], overrides: dict):
    # One chunk per column (as rows.arrow holds them) stays memory-mapped; others are combined.
    single = all(c.num_chunks <= 1 for c in table.columns)
    self.table = table if single else table.combine_chunks()
    self.part_counts = part_counts
    self.paths = Column(
      self.table.column('path').chunk(0)
      if self.table.num_rows
      else pa.array([], pa.large_string()),
      overrides,
    )
    self.meta = Meta(self.table, self.paths)

  def __len__(self) -> int:
    return self.table.num_rows


def row_table(store, parts: Sequence[tuple[int, int]]) -> RowTable:
  """The memory-mapped table of `parts` (rebuilt and saved when it does not match them)."""
  key = _key(store, parts)
  path = os.path.join(store.path, TABLE_FILE)
  table = _open(path, key) if os.path.exists(path) else None
  if table is None:
    pieces = [_read_part(store, g, p) for g, p in parts]
    table = pa.concat_tables(pieces).combine_chunks() if pieces else SCHEMA.empty_table()
    counts = [t.num_rows for t in pieces]
    escaped = _escaped_rows(table)
    _write(path, table, [k + [c] for k, c in zip(key, counts)], escaped)
    reopened = _open(path, key) if os.path.exists(path) else None
    table = reopened if reopened is not None else table
  else:
    meta = table.schema.metadata
    counts = [int(k[4]) for k in json.loads(meta[KEY])]
    escaped = json.loads(meta.get(ESCAPED, b'[]'))
  return RowTable(table, counts, _overrides(store, parts, table, counts, escaped))


def _escaped_rows(table: pa.Table) -> list[int]:
  if not table.num_rows:
    return []
  hits = pc.match_substring(table.column('path'), '\\x').to_numpy(zero_copy_only=False)
  return np.flatnonzero(hits).tolist()


def _overrides(store, parts, table: pa.Table, counts: list[int], escaped: list[int]) -> dict:
  r"""{row: exact plan name} of the rows whose path the CSV holds escaped (\xNN)."""
  hits = np.asarray(escaped, np.int64)
  if not hits.size:
    return {}
  plan_files = {(pg, pp): f for pg, pp, f in store.all_parts()}
  offsets = np.concatenate([[0], np.cumsum(counts)])
  out = {}
  for s in np.unique(np.searchsorted(offsets, hits, side='right') - 1):
    g, p = parts[s]
    names = iter(plan_files.get((g, p), []))
    for row in range(int(offsets[s]), int(offsets[s + 1])):
      escaped = table.column('path')[row].as_py()
      for name in names:
        if files_lib.escape(name) == escaped:
          if name != escaped:
            out[row] = name
          break
  return out
