"""ImageNet backbones by name: public URL and checksum, downloaded once into a cache, verified.

`resolve(spec)` turns `config.train.backbone_init` into a local file plus a record of where it
came from (for the log and the run manifest). `spec` is 'none' (random init), a name in
`BACKBONES` (pycls_r50, pycls_r101, torchvision_r50, torchvision_r101), an http(s) URL, or a local
file / converted directory (used as is; its sha256 recorded). Files are sha256-checked (against
torchvision's name prefix, or the digest recorded at first download), downloaded atomically, and
cached in `config.train.backbone_cache_dir`, else `$DOLG_JAX_WEIGHTS_CACHE`, else
`~/.cache/dolg_jax/weights`. Every failure raises a one-line `WeightsError` (a ValueError).
Checksum and download rules, and why not pooch: docs/design_notes.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import IO, Any

import ml_collections
from absl import logging

from dolg_jax import atomic, progress as progress_lib

PYCLS_BASE = 'https://dl.fbaipublicfiles.com/pycls/dds_baselines/'
TORCHVISION_BASE = 'https://download.pytorch.org/models/'
ENV_CACHE_DIR = 'DOLG_JAX_WEIGHTS_CACHE'
DEFAULT_CACHE_DIR = '~/.cache/dolg_jax/weights'
NONE = 'none'
RECORD_SUFFIX = '.sha256'
# torch.hub's rule (HASH_REGEX): the hex digits after the last '-' of the name are a sha256 prefix.
_HASH_IN_NAME = re.compile(r'-([a-f0-9]{8,64})\.[^-]*$')
_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A published ImageNet backbone: where it is and what it is."""

  url: str
  depth: int
  layout: str  # 'pycls' (BGR input, stem/s{i}.b{j} keys) | 'torchvision' (RGB, layer{i}).
  width: int = 64

  @property
  def file_name(self) -> str:
    return file_name_of(self.url)

  @property
  def sha256_prefix(self) -> str | None:
    return sha256_prefix_of(self.file_name)


BACKBONES: Mapping[str, Backbone] = {
  'pycls_r50': Backbone(PYCLS_BASE + '161235311/R-50-1x64d_dds_8gpu.pyth', 50, 'pycls'),
  'pycls_r101': Backbone(PYCLS_BASE + '161167170/R-101-1x64d_dds_8gpu.pyth', 101, 'pycls'),
  'torchvision_r50': Backbone(TORCHVISION_BASE + 'resnet50-0676ba61.pth', 50, 'torchvision'),
  'torchvision_r101': Backbone(TORCHVISION_BASE + 'resnet101-63fe2227.pth', 101, 'torchvision'),
}


# ----------------------------------------------------------------------------------------- errors
class WeightsError(ValueError):
  """A backbone could not be resolved, downloaded or verified (one line: what and what to do)."""


class DownloadError(WeightsError):
  """The transfer failed or was interrupted; nothing was kept."""


class OfflineError(DownloadError):
  """The URL cannot be reached; the message says where to place the file by hand."""


class ChecksumError(WeightsError):
  """A file's sha256 differs from the published prefix or the recorded digest."""


# ------------------------------------------------------------------------------------ the record
@dataclasses.dataclass(frozen=True)
class Resolved:
  """Where the backbone comes from. `path` is None for 'none' (random initialisation)."""

  spec: str
  path: str | None
  name: str | None = None
  url: str | None = None
  sha256: str | None = None
  verification: str = ''
  downloaded: bool = False

  @property
  def source(self) -> str:
    if self.path is None:
      return 'random initialisation'
    return self.name or self.url or self.path

  def record(self) -> dict[str, Any]:
    """The manifest entry."""
    return {
      'spec': self.spec,
      'source': self.source,
      'name': self.name,
      'url': self.url,
      'path': self.path,
      'sha256': self.sha256,
      'verification': self.verification,
      'downloaded': self.downloaded,
    }

  def describe(self) -> str:
    """One log line."""
    if self.path is None:
      return (
        f"none: random initialisation (config.train.backbone_init={self.spec!r}); the paper "
        f"and the official code start from ImageNet weights"
      )
    where = f' ({self.url})' if self.url and self.name else ''
    return f'{self.source}{where} sha256 {self.sha256} [{self.verification}] file {self.path}'


# ------------------------------------------------------------------------------------- helpers
def file_name_of(url: str) -> str:
  """The file name of a URL's path (percent-decoded); an error if it has none."""
  name = os.path.basename(urllib.parse.unquote(urllib.parse.urlparse(url).path))
  if not name or name in ('.', '..'):
    raise WeightsError(f'{url}: the URL names no file (its path must end with the file name)')
  return name


def sha256_prefix_of(file_name: str) -> str | None:
  """The sha256 prefix a file name carries (torch.hub convention `name-<hex>.ext`), or None."""
  m = _HASH_IN_NAME.search(file_name)
  return m.group(1) if m else None


def is_url(spec: str) -> bool:
  return spec.startswith(('http://', 'https://'))


def resolve_cache_dir(configured: str = '') -> str:
  """`configured` if non-empty, else $DOLG_JAX_WEIGHTS_CACHE, else ~/.cache/dolg_jax/weights."""
  return os.path.abspath(
    os.path.expanduser(configured or os.environ.get(ENV_CACHE_DIR) or DEFAULT_CACHE_DIR)
  )


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
  return h.hexdigest()


def sha256_dir(path: str) -> str:
  """sha256 over the sorted (relative name, sha256 of the file) of every file below `path`."""
  h = hashlib.sha256()
  for root, dirs, files in os.walk(path):
    dirs.sort()
    for name in sorted(files):
      full = os.path.join(root, name)
      h.update(f'{os.path.relpath(full, path)}\0{sha256_file(full)}\n'.encode())
  return h.hexdigest()


def read_record(record_path: str) -> str | None:
  """The sha256 recorded in `record_path` (sha256sum format), None when the file is absent."""
  if not os.path.exists(record_path):
    return None
  with open(record_path) as f:
    fields = f.read().split()
  if not fields or not re.fullmatch(r'[0-9a-f]{64}', fields[0]):
    raise ChecksumError(
      f'{record_path}: not a sha256 record (expected "<64 hex digits>  <file>"); '
      f'delete it to record the file again'
    )
  return fields[0]


def write_record(record_path: str, sha256: str, file_name: str) -> None:
  atomic.write_text(record_path, f'{sha256}  {file_name}\n')


def _progress(total: int | None, name: str, enabled: bool) -> progress_lib.Printer:
  """Lines of bytes received, rate and ETA (no ETA when the size is unknown), every 2 s."""
  name = name.replace('{', '{{').replace('}', '}}')
  bar_format = (
    name + ': {n_fmt}B/{total_fmt}B {percentage:.0f}% {rate_fmt} ETA {remaining}'
    if total is not None
    else name + ': {n_fmt}B {rate_fmt}'
  )
  meter = {'unit': 'B', 'unit_scale': True, 'unit_divisor': 1024}
  return progress_lib.Printer(progress_lib.Progress(total, bar_format, **meter), enabled)


def _offline(url: str, dest: str, reason: str) -> OfflineError:
  return OfflineError(
    f'cannot download {url} ({reason}). Without internet, fetch {os.path.basename(dest)} '
    f'elsewhere and put it at {dest} (cache directory: config.train.backbone_cache_dir, '
    f'${ENV_CACHE_DIR} or {DEFAULT_CACHE_DIR}), or set config.train.backbone_init to its path.'
  )


# ------------------------------------------------------------------------------------ download
def download(
  url: str,
  dest: str,
  *,
  sha256_prefix: str | None = None,
  expected_sha256: str | None = None,
  record_path: str | None = None,
  progress: bool = True,
  timeout: float = 60.0,
) -> str:
  """Downloads `url` to `dest` atomically after verifying it; returns its sha256.

  `sha256_prefix` (published) and `expected_sha256` (recorded earlier) are checked when given;
  `record_path` receives the digest (written before `dest` appears). On any failure nothing is
  left: the temporary file is removed and `dest` is not created.
  """
  directory = os.path.dirname(os.path.abspath(dest))
  os.makedirs(directory, exist_ok=True)
  kept = f'nothing was kept in {directory}; rerun to retry'
  with atomic.writing(dest, 'wb') as f:  # On any error below, nothing is left.
    digest = _receive(url, dest, f, kept, progress, timeout)
    if sha256_prefix is not None and not digest.startswith(sha256_prefix):
      raise ChecksumError(
        f'{url}: the downloaded file has sha256 {digest}, but its name says it '
        f'starts with {sha256_prefix}; {kept}'
      )
    if expected_sha256 is not None and digest != expected_sha256:
      raise ChecksumError(
        f'{url}: the downloaded file has sha256 {digest}, not {expected_sha256} as recorded at '
        f'the first download in {record_path}; {kept} (if the publisher replaced the file, '
        f'delete {record_path} to accept the new one)'
      )
    if record_path is not None:
      write_record(record_path, digest, os.path.basename(dest))
  return digest


def _receive(url: str, dest: str, f: IO[bytes], kept: str, progress: bool, timeout: float) -> str:
  """Streams `url` into the open file `f`; returns the sha256 of what was received whole."""
  request = urllib.request.Request(url, headers={'User-Agent': 'dolg_jax'})
  try:
    response = urllib.request.urlopen(request, timeout=timeout)
  except urllib.error.HTTPError as e:
    raise _offline(url, dest, f'HTTP {e.code} {e.reason}') from e
  except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
    raise _offline(url, dest, str(getattr(e, 'reason', e))) from e
  with response:
    length = response.headers.get('Content-Length')
    chunked = 'chunked' in (response.headers.get('Transfer-Encoding') or '').lower()
    if length is None and not chunked:
      raise DownloadError(
        f'{url}: the server states no Content-Length, so an interrupted '
        f'transfer could not be told apart; {kept} (place the file by hand '
        f'at {dest})'
      )
    total = int(length) if length is not None else None
    h, received = hashlib.sha256(), 0
    printer = _progress(total, os.path.basename(dest), progress)
    try:
      while chunk := response.read(_CHUNK):
        f.write(chunk)
        h.update(chunk)
        received += len(chunk)
        printer.update(len(chunk))
    except (OSError, http.client.HTTPException) as e:  # Reset, timeout, IncompleteRead.
      raise DownloadError(
        f'download of {url} interrupted after {received} bytes ({type(e).__name__}: {e}); {kept}'
      ) from e
    finally:
      printer.close()
    if total is not None and received != total:
      raise DownloadError(
        f'download of {url} interrupted: received {received} of {total} bytes; {kept}'
      )
  return h.hexdigest()


def _verify_cached(
  path: str, prefix: str | None, recorded: str | None, record_path: str
) -> tuple[str, str]:
  """(sha256, how it was verified) of a cached file; raises ChecksumError when it changed."""
  digest = sha256_file(path)
  fix = f'delete it (and {record_path}) to download it again'
  if prefix is not None and not digest.startswith(prefix):
    raise ChecksumError(
      f'{path}: sha256 {digest} does not start with {prefix} as its name says: '
      f'the file is corrupt or was replaced; {fix}'
    )
  if recorded is not None and digest != recorded:
    raise ChecksumError(
      f'{path}: sha256 {digest} differs from {recorded} recorded at the first '
      f'download in {record_path}: the file is corrupt or was replaced; {fix}'
    )
  checks = []
  if prefix is not None:
    checks.append(f'published prefix {prefix}')
  if recorded is not None:
    checks.append(f'recorded in {os.path.basename(record_path)}')
  return digest, ('cached; matches ' + ' and '.join(checks)) if checks else 'cached'


def fetch(
  url: str, *, directory: str, progress: bool = True, timeout: float = 60.0
) -> tuple[str, str, str, bool]:
  """(path, sha256, verification, downloaded) of `url` in the cache `directory`."""
  name = file_name_of(url)
  dest = os.path.join(directory, name)
  record_path = dest + RECORD_SUFFIX
  prefix = sha256_prefix_of(name)
  recorded = read_record(record_path)
  if os.path.isfile(dest):
    digest, how = _verify_cached(dest, prefix, recorded, record_path)
    if recorded is None:  # Placed by hand (or cached before records existed): record it now.
      write_record(record_path, digest, name)
      how = (f'published prefix {prefix}; ' if prefix else '') + (
        f'found in the cache, sha256 recorded at first use in {name}{RECORD_SUFFIX}'
      )
    return dest, digest, how, False
  logging.info('Downloading %s to %s.', url, dest)
  digest = download(
    url,
    dest,
    sha256_prefix=prefix,
    expected_sha256=recorded,
    record_path=record_path,
    progress=progress,
    timeout=timeout,
  )
  if prefix is not None:
    how = f'downloaded; matches the published prefix {prefix}'
  elif recorded is not None:
    how = f'downloaded; matches the sha256 recorded in {name}{RECORD_SUFFIX}'
  else:
    how = f'downloaded; no published checksum: sha256 recorded in {name}{RECORD_SUFFIX}'
  return dest, digest, how, True


# ------------------------------------------------------------------------------------- public API
def check_model(
  spec: str, model_cfg: ml_collections.ConfigDict, table: Mapping[str, Backbone] | None = None
) -> None:
  """A named backbone must have the model's depth and width (before anything is downloaded)."""
  table = BACKBONES if table is None else table
  if spec not in table:
    return
  bb = table[spec]
  stage_depths = tuple(model_cfg.get('stage_depths', ()) or ())
  problems = []
  if stage_depths:
    problems.append(
      f'config.model.stage_depths={stage_depths} (the named backbones are standard ResNets)'
    )
  elif int(model_cfg.depth) != bb.depth:
    problems.append(f'config.model.depth={model_cfg.depth}')
  if int(model_cfg.width) != bb.width:
    problems.append(f'config.model.width={model_cfg.width}')
  if problems:
    fits = (
      [
        n
        for n, b in table.items()
        if b.depth == int(model_cfg.depth) and b.width == int(model_cfg.width)
      ]
      if not stage_depths
      else []
    )
    instead = ' or '.join(map(repr, fits)) or 'a backbone file of the model\'s shape'
    raise WeightsError(
      f'config.train.backbone_init={spec!r} is a ResNet-{bb.depth} of width {bb.width} but '
      f'{" and ".join(problems)}; use {instead}, or {NONE!r} to start from random weights'
    )


def resolve(
  spec: str,
  *,
  cache_dir: str = '',
  model: ml_collections.ConfigDict | None = None,
  table: Mapping[str, Backbone] | None = None,
  progress: bool = True,
  timeout: float = 60.0,
) -> Resolved:
  """The backbone named by `spec` ('none', a name of `table`, a URL or a local path) as a local
  file, downloaded and verified as docs/design_notes.md says.

  Args:
    spec: config.train.backbone_init.
    cache_dir: config.train.backbone_cache_dir ('' = $DOLG_JAX_WEIGHTS_CACHE or the default).
    model: config.model; named backbones are checked against its depth and width first.
    table: name -> Backbone (default `BACKBONES`; tests pass their own URLs).
    progress: show download progress.
    timeout: seconds without data before a connection is given up.
  """
  table = BACKBONES if table is None else table
  spec = str(spec).strip()
  if not spec:
    raise WeightsError(
      f'config.train.backbone_init is empty: name an ImageNet backbone '
      f'({", ".join(table)}), an http(s) URL or a local file, or {NONE!r} to '
      f'start from random weights'
    )
  if spec == NONE:
    return Resolved(spec, None, verification='random initialisation')
  if model is not None:
    check_model(spec, model, table)
  directory = resolve_cache_dir(cache_dir)
  if spec in table:
    bb = table[spec]
    path, digest, how, downloaded = fetch(
      bb.url, directory=directory, progress=progress, timeout=timeout
    )
    return Resolved(
      spec, path, name=spec, url=bb.url, sha256=digest, verification=how, downloaded=downloaded
    )
  if is_url(spec):
    path, digest, how, downloaded = fetch(
      spec, directory=directory, progress=progress, timeout=timeout
    )
    return Resolved(spec, path, url=spec, sha256=digest, verification=how, downloaded=downloaded)
  path = os.path.abspath(os.path.expanduser(spec))
  if os.path.isfile(path):
    return Resolved(spec, path, sha256=sha256_file(path), verification='local file, as given')
  if os.path.isdir(path):
    return Resolved(
      spec,
      path,
      sha256=sha256_dir(path),
      verification='local directory, as given (sha256 over its files)',
    )
  raise WeightsError(
    f'config.train.backbone_init={spec!r}: not a backbone name '
    f'({", ".join(table)}), an http(s) URL, {NONE!r}, or an existing file or '
    f'directory'
  )
