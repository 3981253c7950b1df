"""Which files a collection holds: `list_images(images) -> (absolute root, relative paths)`.

`images` is a folder, searched recursively (symlinked folders not followed, hidden names left out,
a file taken when its extension, in any case, is in `IMAGE_EXTENSIONS`), or a UTF-8 list file (BOM
allowed) of one path per line, relative to its folder or absolute, each taken exactly as written
whatever its extension (blank and '#' lines ignored). Paths are normalised against the root ('/'
separators; `a/./b.jpg`, `a/../a/b.jpg`, `ROOT/a/b.jpg` are `a/b.jpg`; one outside the root stays
absolute); names that are not UTF-8 keep Python's surrogate escapes (`escape` prints them as \\xNN).
They come back sorted (code-point order: the index's row order) and unique. Raises `ListFileError`
(a list line not UTF-8, naming file and line) and FileNotFoundError (neither folder nor file).
"""

from __future__ import annotations

import codecs
import os

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.tif', '.tiff')


def is_image_name(name: str) -> bool:
  return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(images: str) -> tuple[str, list[str]]:
  """(absolute root, sorted unique relative paths) of a folder or a list file (module docstring)."""
  images = os.path.expanduser(os.fspath(images))
  if os.path.isdir(images):
    root = os.path.abspath(images)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames[:] = [d for d in dirnames if not d.startswith('.')]
      rel_dir = os.path.relpath(dirpath, root)
      for f in filenames:
        if not f.startswith('.') and is_image_name(f):
          rel = f if rel_dir == '.' else os.path.join(rel_dir, f)
          out.append(rel.replace(os.sep, '/'))
    return root, sorted(set(out))
  if os.path.isfile(images):
    root = os.path.dirname(os.path.abspath(images))
    return root, sorted(set(_list_file(images, root)))
  raise FileNotFoundError(f'--images={images} is neither a folder nor a list file')


class ListFileError(ValueError):
  """A list file that cannot be read as UTF-8 text (names the file and line)."""


def _list_file(path: str, root: str) -> list[str]:
  with open(path, 'rb') as f:
    data = f.read()
  if data.startswith(codecs.BOM_UTF8):
    data = data[len(codecs.BOM_UTF8) :]
  out = []
  for number, raw in enumerate(data.split(b'\n'), 1):
    try:
      line = raw.decode('utf-8').removesuffix('\r')
    except UnicodeDecodeError as e:
      raise ListFileError(
        f'{path}, line {number}: not UTF-8 text (byte {raw[e.start]:#04x} at '
        f'column {e.start + 1}); save the list as UTF-8'
      ) from None
    if line.strip() and not line.startswith('#'):
      out.append(normalise(root, line))
  return out


def normalise(root: str, path: str) -> str:
  """`path` (relative to `root` or absolute) as the index names it (module docstring)."""
  full = os.path.normpath(os.path.join(root, path))
  rel = os.path.relpath(full, root)
  if rel == os.pardir or rel.startswith(os.pardir + os.sep):
    return full
  return rel.replace(os.sep, '/')


def escape(path: str) -> str:
  """`path` printable and writable as UTF-8: bytes that are not UTF-8 (kept by the OS layer as
  surrogates) written as \\xNN; other paths unchanged."""
  try:
    path.encode('utf-8')
    return path
  except UnicodeEncodeError:
    return os.fsencode(path).decode('utf-8', 'backslashreplace')


def absolute(root: str, rel: str) -> str:
  """The file a path of the index names."""
  return os.path.join(root, rel)
