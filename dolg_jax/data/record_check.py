"""Damaged prepared data: read every record back (`verify_prepared`), and name the file when a
record cannot be read during training (`NamedSource`).

`python -m dolg_jax.data.prepare --verify --dataset=D --data_dir=DIR` calls `verify_prepared`: for
every split it opens each ArrayRecord file of the split, reads all its records, decodes each as the
dataset's features, and compares the count with the one recorded at preparation. Every damaged
file is reported with the reason; nothing is modified.
"""

from __future__ import annotations

import os
from typing import Any

from array_record.python import array_record_module

from dolg_jax import errors

_CHUNK = 256


class DamagedRecordError(RuntimeError):
  """A record of a prepared dataset could not be read."""


def verify_command(dataset: str, data_dir: str) -> str:
  return f'python -m dolg_jax.data.prepare --verify --dataset={dataset} --data_dir={data_dir}'


def verify_file(path: str, expected: int | None, features=None) -> str | None:
  """None if every record of the ArrayRecord file `path` reads (and decodes) and their number is
  `expected`; otherwise what is wrong."""
  if not os.path.exists(path):
    return 'missing'
  try:
    reader = array_record_module.ArrayRecordReader(path)
  except Exception as e:  # noqa: BLE001  # reported per file
    return f'cannot be opened ({errors.first_line(e, limit=300)})'
  try:
    n = reader.num_records()
    for start in range(0, n, _CHUNK):
      try:
        records = reader.read(start, min(n, start + _CHUNK))
      except Exception as e:  # noqa: BLE001  # reported per file
        return (
          f'records {start}..{min(n, start + _CHUNK) - 1} unreadable '
          f'({errors.first_line(e, limit=300)})'
        )
      if features is not None:
        for k, record in enumerate(records):
          try:
            features.deserialize_example_np(record)
          except Exception as e:  # noqa: BLE001  # reported per file
            return f'record {start + k} does not decode ({errors.first_line(e, limit=300)})'
  finally:
    reader.close()
  if expected is not None and n != expected:
    return f'{n} records, {expected} were written'
  return None


def verify_prepared(builder) -> dict[str, Any]:
  """{'files': n, 'records': n, 'damaged': {path: reason}} of a prepared TFDS builder."""
  damaged, files, records = {}, 0, 0
  features = builder.info.features
  for split in builder.info.splits.values():
    lengths = list(split.shard_lengths) or [None] * len(split.filenames)
    for name, expected in zip(split.filenames, lengths):
      path = os.path.join(os.fspath(builder.data_path), name)
      files += 1
      problem = verify_file(path, expected, features)
      if problem:
        damaged[path] = problem
      else:
        records += expected or 0
  return {'files': files, 'records': records, 'damaged': damaged}


class NamedSource:
  """A TFDS ArrayRecord data source whose read errors name the file and the verify command."""

  def __init__(self, source, dataset: str, data_dir: str):
    self._source, self._dataset, self._data_dir = source, dataset, data_dir

  def __len__(self) -> int:
    return len(self._source)

  def _where(self, index: int) -> str:
    inner = getattr(self._source, 'data_source', None)
    try:
      reader, position = inner._reader_idx_and_position(index)
      return f'{inner._paths[reader]} (record {position})'
    except Exception:  # noqa: BLE001  # the name is a courtesy; fall back
      return f'a file of {self._dataset} in {self._data_dir}'

  def __getitem__(self, index):
    try:
      return self._source[index]
    except Exception as e:  # re-raised naming the file
      raise DamagedRecordError(
        f'reading example {int(index)} from {self._where(int(index))} failed: '
        f'{errors.first_line(e, limit=300)}. The prepared data is damaged: run '
        f'`{verify_command(self._dataset, self._data_dir)}` to list the damaged files, then '
        'prepare the dataset again'
      ) from e
