"""Read one file of a collection, whatever it is: `read_image(path, limits) -> Read`.

A file becomes an image or a reason, never an exception: not a regular file (FIFO, device,
socket, folder), vanished or a dangling link, no permission, more bytes than `limits.max_bytes`,
more pixels than `limits.max_pixels` (read from the header, before any decode), a corrupt or
truncated JPEG, or bytes no decoder reads. The file is opened without blocking (a FIFO never
hangs a run) and checked with fstat on the open descriptor, so what is read is what was checked;
symlinks are followed (a link to a regular file is read as that file). Reasons never quote the
file's content. Decoding is evaluation's (`data.decode.decode_rgb`, `cv2.imread`-exact).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import re
import stat
import warnings
from typing import Optional

import numpy as np
from PIL import Image

from dolg_jax.data import decode

MAX_PIXELS = 150_000_000  # the default pixel limit: every camera photo; a 20000^2 bomb is 400M
MAX_FILE_MB = 512  # the default size limit of one file
_CHUNK = 1 << 20

# Our limit replaces Pillow's warning for images between its threshold and ours.
warnings.simplefilter('ignore', Image.DecompressionBombWarning)


@dataclasses.dataclass(frozen=True)
class Limits:
  """What one file may cost before it is refused (the index and search flags)."""

  max_pixels: int = MAX_PIXELS  # from the header, before decoding
  max_file_mb: int = MAX_FILE_MB

  @property
  def max_bytes(self) -> int:
    return self.max_file_mb << 20

  def check(self) -> None:
    if self.max_pixels < 1 or self.max_file_mb < 1:
      raise ValueError(
        f'--max_pixels and --max_file_mb must be >= 1; got {self.max_pixels}, {self.max_file_mb}'
      )


@dataclasses.dataclass
class Read:
  """One file's outcome: `image` (uint8 RGB, EXIF-oriented) and its row, or `reason`."""

  reason: Optional[str] = None
  image: Optional[np.ndarray] = None
  height: int = 0  # of the decoded image (before any resize)
  width: int = 0
  bytes: int = 0
  sha1: str = ''

  def row(self, path: str) -> dict:
    return {
      'path': path,
      'height': self.height,
      'width': self.width,
      'bytes': self.bytes,
      'sha1': self.sha1,
    }


_KINDS = (
  (stat.S_ISDIR, 'a folder'),
  (stat.S_ISFIFO, 'a FIFO (named pipe)'),
  (stat.S_ISCHR, 'a character device'),
  (stat.S_ISBLK, 'a block device'),
  (stat.S_ISSOCK, 'a socket'),
)


def _kind(mode: int) -> str:
  return next((name for test, name in _KINDS if test(mode)), 'not a regular file')


def _os_reason(e: OSError) -> str:
  if e.errno == errno.ENOENT:
    return 'vanished (or a dangling link): no such file'
  if e.errno in (errno.EACCES, errno.EPERM):
    return 'permission denied'
  if e.errno == errno.ELOOP:
    return 'a symlink loop'
  return f'unreadable: {e.strerror or type(e).__name__}'


def read_bytes(path: str, max_bytes: int) -> tuple[Optional[bytes], Optional[str]]:
  """(bytes, None) of a regular file of at most `max_bytes`, else (None, reason)."""
  try:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, 'O_CLOEXEC', 0))
  except OSError as e:
    return None, _os_reason(e)
  try:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
      return None, f'not a regular file: {_kind(st.st_mode)}'
    if st.st_size > max_bytes:
      return None, f'file too large: {st.st_size} bytes > --max_file_mb={max_bytes >> 20}'
    chunks, total = [], 0
    while True:
      chunk = os.read(fd, _CHUNK)
      if not chunk:
        break
      total += len(chunk)
      if total > max_bytes:  # grew while being read
        return None, f'file too large: over --max_file_mb={max_bytes >> 20}'
      chunks.append(chunk)
    return b''.join(chunks), None
  except OSError as e:
    return None, _os_reason(e)
  finally:
    os.close(fd)


def pixel_reason(data: bytes, max_pixels: int) -> Optional[str]:
  """Why the header refuses the image (too many pixels), or None (header read or not)."""
  try:
    h, w = decode.image_size(data)
  except decode.DecodeError as e:
    if isinstance(e.__cause__, Image.DecompressionBombError):  # Pillow's own limit, far above ours
      n = re.search(r'\((\d+) pixels\)', str(e.__cause__))
      if n and int(n.group(1)) <= max_pixels:
        return None  # under our limit: the decoders decide
      count = n.group(1) if n else 'more than Pillow allows'
      return f'too many pixels: {count} > --max_pixels={max_pixels}'
    return None  # no header Pillow reads: the decoders decide
  if h * w > max_pixels:
    return f'too many pixels: {w}x{h} = {h * w} > --max_pixels={max_pixels}'
  return None


def decode_image(data: bytes, max_pixels: int) -> tuple[Optional[np.ndarray], Optional[str]]:
  """(uint8 RGB image, None) or (None, reason) of encoded bytes (module docstring)."""
  if not data:
    return None, 'empty file'
  reason = pixel_reason(data, max_pixels)
  if reason:
    return None, reason
  try:
    if decode.is_jpeg(data):
      bad = decode.check_decodable(data)
      if bad is not None:
        return None, f'corrupt or truncated JPEG: {bad}'
    img = decode.decode_rgb(data)
  except decode.DecodeError as e:
    return None, f'not a decodable image: {e}'
  except Exception as e:  # noqa: BLE001  # any decoder failure is this file's
    return None, f'not a decodable image: {type(e).__name__}: {str(e).splitlines()[0][:200]}'
  if img.ndim != 3 or img.shape[2] != 3 or min(img.shape[:2]) < 1:
    return None, f'decoded to unexpected shape {img.shape}'
  if img.shape[0] * img.shape[1] > max_pixels:
    return None, f'too many pixels: {img.shape[1]}x{img.shape[0]} > --max_pixels={max_pixels}'
  return img, None


def read_image(path: str, limits: Limits = Limits()) -> Read:
  """The image of the file at `path`, or why it cannot be indexed (module docstring)."""
  data, reason = read_bytes(path, limits.max_bytes)
  if reason:
    return Read(reason=reason)
  img, reason = decode_image(data, limits.max_pixels)
  if reason:
    return Read(reason=reason, bytes=len(data))
  return Read(
    image=img,
    height=int(img.shape[0]),
    width=int(img.shape[1]),
    bytes=len(data),
    sha1=hashlib.sha1(data).hexdigest(),
  )
