"""Why a `.pth`/`.pyth` file did not load: damaged / not torch, or a torch file holding objects.

`inspect_file(path) -> Inspection` looks at a file that `torch.load(weights_only=True)` refused,
stdlib only and running none of its code (pickles are replayed with inert stand-ins for every class
they name). `Inspection.damage` says what is wrong with a damaged or non-torch file (empty, a zip
cut short or failing its CRC, no `data.pkl`, no torch magic number, a broken pickle);
`Inspection.objects` lists the Python objects beyond tensors that a complete torch checkpoint names
(e.g. `argparse.Namespace`): reading it needs full unpickling (`allow_pickle`), for trusted files
only.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import zipfile
import zlib
from typing import Any, BinaryIO

# torch.serialization.MAGIC_NUMBER: the first pickle of a legacy (non-zip) torch file.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_ZIP_MAGIC = b'PK\x03\x04'
# Globals a tensors-only state dict names (torch's own rebuild functions, storages, dtypes, ...).
_PLAIN_MODULE_PREFIXES = ('torch', 'collections', '_codecs', 'builtins', '__builtin__')
_UNPICKLE_ERRORS = (
  pickle.UnpicklingError,
  EOFError,
  ValueError,
  TypeError,
  KeyError,
  IndexError,
  AttributeError,
  MemoryError,
  OverflowError,
  UnicodeDecodeError,
  RecursionError,
)


@dataclasses.dataclass(frozen=True)
class Inspection:
  size: int  # bytes on disk
  damage: str | None  # what makes it unreadable / not torch; None when intact
  objects: tuple[str, ...]  # 'module.name' of non-tensor globals its pickle names
  layout: str  # 'zip', 'legacy' or 'unknown'


class _Inert:
  """Stands in for every class or function a pickle names: accepts anything, does nothing."""

  def __init__(self, *args: Any, **kwargs: Any):
    del args, kwargs

  def __call__(self, *args: Any, **kwargs: Any) -> '_Inert':
    return _Inert()

  def __setstate__(self, state: Any) -> None:
    del state

  def __setitem__(self, key: Any, value: Any) -> None:
    del key, value

  def append(self, value: Any) -> None:
    del value

  def extend(self, values: Any) -> None:
    del values

  def add(self, value: Any) -> None:
    del value


class _RecordingUnpickler(pickle.Unpickler):
  """Replays a pickle, recording the globals it names and importing none of them."""

  def __init__(self, f: BinaryIO, named: set[str]):
    super().__init__(f)
    self._named = named

  def find_class(self, module: str, name: str) -> Any:
    self._named.add(f'{module}.{name}')
    return _Inert

  def persistent_load(self, pid: Any) -> Any:
    return _Inert()


def _replay(f: BinaryIO, named: set[str]) -> Any:
  return _RecordingUnpickler(f, named).load()


def _objects(named: set[str]) -> tuple[str, ...]:
  return tuple(sorted(n for n in named if n.split('.')[0] not in _PLAIN_MODULE_PREFIXES))


def _inspect_zip(path: str, size: int) -> Inspection:
  try:
    with zipfile.ZipFile(path) as zf:
      pkls = [n for n in zf.namelist() if n == 'data.pkl' or n.endswith('/data.pkl')]
      if not pkls:
        return Inspection(
          size, 'a zip archive without data.pkl, so not a torch checkpoint', (), 'zip'
        )
      bad = zf.testzip()
      if bad is not None:
        return Inspection(size, f'zip member {bad} fails its CRC check', (), 'zip')
      data = zf.read(pkls[0])
  except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
    return Inspection(
      size,
      f'starts like the zip archive torch.save writes but cannot be opened as one ({e})',
      (),
      'zip',
    )
  named: set[str] = set()
  try:
    _replay(io.BytesIO(data), named)
  except _UNPICKLE_ERRORS as e:
    return Inspection(size, f'its data.pkl is damaged ({type(e).__name__}: {e})', (), 'zip')
  return Inspection(size, None, _objects(named), 'zip')


def _inspect_legacy(path: str, size: int) -> Inspection:
  named: set[str] = set()
  with open(path, 'rb') as f:
    try:
      magic = _replay(f, named)
    except _UNPICKLE_ERRORS:
      return Inspection(
        size, 'neither the zip archive nor the pickle that torch.save writes', (), 'unknown'
      )
    if not isinstance(magic, int) or magic != LEGACY_MAGIC:
      return Inspection(
        size, 'a pickle without torch\'s magic number, not written by torch.save', (), 'unknown'
      )
    try:
      for _ in range(4):  # protocol version, system info, the object, its storage keys
        _replay(f, named)
    except _UNPICKLE_ERRORS as e:
      return Inspection(
        size, f'a legacy torch file cut short ({type(e).__name__}: {e})', (), 'legacy'
      )
  return Inspection(size, None, _objects(named), 'legacy')


def inspect_file(path: str | os.PathLike) -> Inspection:
  """Classifies a file torch would not load safely (see the module docstring); runs none of it."""
  path = os.fspath(path)
  size = os.path.getsize(path)
  if size == 0:
    return Inspection(0, 'an empty file', (), 'unknown')
  with open(path, 'rb') as f:
    head = f.read(len(_ZIP_MAGIC))
  if head == _ZIP_MAGIC or zipfile.is_zipfile(path):
    return _inspect_zip(path, size)
  return _inspect_legacy(path, size)
