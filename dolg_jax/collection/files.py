"""Which files a collection holds: `list_images(images) -> (root, relative paths)`.

`images` is either
* a folder: searched recursively (symlinked folders are not followed); a file is an image when its
  extension, in any case, is one of `IMAGE_EXTENSIONS` (jpg, jpeg, png, webp, bmp, tif, tiff);
  paths are relative to the folder, with '/' separators; hidden files and folders (a name starting
  with '.') are left out;
* a text file with one path per line, relative to the file's folder (absolute paths are kept as
  they are); blank lines and lines starting with '#' are ignored; whatever the extension, every
  listed file is taken (an unreadable one is skipped when indexed, with its reason).

The paths come back sorted (code-point order) and without duplicates: the order an index assigns
its rows in, whatever order the file system lists them in.
"""

from __future__ import annotations

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
    out = []
    with open(images, encoding='utf-8') as f:
      for line in f:
        line = line.strip()
        if line and not line.startswith('#'):
          out.append(os.path.normpath(line).replace(os.sep, '/'))
    return root, sorted(set(out))
  raise FileNotFoundError(f'--images={images} is neither a folder nor a list file')


def absolute(root: str, rel: str) -> str:
  """The file a path of the index names."""
  return os.path.join(root, rel)
