"""Atomic file writes: a reader finds the old file or the whole new one, never a part of it.

Every writer goes through `replacing(path)`: it yields a new, unique temporary path in the same
folder (`.NAME.tmp-PID-RANDOM`, created with the usual permissions), and when the block ends
without an error it fsyncs that file, `os.replace`s it onto `path` and fsyncs the folder (where
the platform allows); on any error the temporary file is removed and the error propagates.
`writing(path, mode)` yields a file opened on it (np.save, tarfile, json.dump); `write_bytes`,
`write_text` and `write_json` write one value. A writer that takes a path (faiss.write_index)
uses `replacing` itself.
"""

import contextlib
import json
import os
import secrets
from typing import IO, Any, Iterator


def _temporary(path: str) -> str:
  """Creates an empty, unique file beside `path` (mode 0o666 less the umask) and returns it."""
  folder, name = os.path.split(os.path.abspath(path))
  while True:
    tmp = os.path.join(folder, f'.{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}')
    try:
      os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
      return tmp
    except FileExistsError:
      continue


def _fsync(path: str, flags: int) -> None:
  fd = os.open(path, flags)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _fsync_folder(folder: str) -> None:
  """fsync of the folder (the rename), where the platform allows it (not on Windows)."""
  with contextlib.suppress(OSError, AttributeError):
    _fsync(folder, os.O_RDONLY | getattr(os, 'O_DIRECTORY'))


@contextlib.contextmanager
def replacing(path: str) -> Iterator[str]:
  """Yields a temporary path to write; then fsync, rename onto `path`, fsync of the folder."""
  tmp = _temporary(path)
  try:
    yield tmp
    _fsync(tmp, os.O_RDONLY)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise
  _fsync_folder(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def writing(path: str, mode: str = 'wb', **open_kwargs: Any) -> Iterator[IO]:
  """Yields a file opened with `mode` ('wb', 'w', ...) that becomes `path` atomically."""
  with replacing(path) as tmp:
    with open(tmp, mode, **open_kwargs) as f:
      yield f


def write_bytes(path: str, data: bytes) -> None:
  with writing(path, 'wb') as f:
    f.write(data)


def write_text(path: str, text: str, encoding: str = 'utf-8') -> None:
  write_bytes(path, text.encode(encoding))


def write_json(path: str, obj: Any, **dump_kwargs: Any) -> None:
  """`json.dump(obj, f, **dump_kwargs)` and a newline, atomically (UTF-8)."""
  with writing(path, 'w', encoding='utf-8') as f:
    json.dump(obj, f, **dump_kwargs)
    f.write('\n')
