"""`WORKDIR/manifest.json`: what a run needs to be reproduced.

`build_manifest(config, seeds=, dataset=, extra=)` -> {created, command, config (resolved), git
{commit, dirty}, packages, devices, seeds, dataset (name, version, splits, build options, a
`directory_fingerprint` of its files), env (XLA_FLAGS, ...)} plus the loop's `extra` (start_step,
total_steps, steps_per_epoch, mesh, `start`, `backbone` = dolg_jax.weights.imagenet.Resolved.record,
`config_changes`). `write_manifest(workdir, manifest)` writes it atomically; a resumed run appends
its own entry under `resumes` instead of overwriting the original record.
"""

import datetime
import hashlib
import json
import os
import subprocess
import sys
from typing import Any, Mapping

import jax
import ml_collections

from dolg_jax import atomic
from dolg_jax import versions

PACKAGES = (
  'jax',
  'jaxlib',
  'flax',
  'optax',
  'orbax-checkpoint',
  'grain',
  'ml_collections',
  'numpy',
  'tensorflow-datasets',
  'array_record',
  'simplejpeg',
  'jax-cuda12-plugin',
  'libtpu',
)
_FULL_HASH_BYTES = 16 << 20
_CHUNK = 1 << 20


def git_info(repo_dir: str | None = None) -> dict[str, Any]:
  """{'commit', 'dirty'} of the repository holding this code (None when not a git checkout)."""
  repo_dir = repo_dir or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def git(*args):
    return subprocess.run(['git', *args], cwd=repo_dir, capture_output=True, text=True, timeout=30)

  try:
    head = git('rev-parse', 'HEAD')
    status = git('status', '--porcelain', '--untracked-files=no')
  except (OSError, subprocess.TimeoutExpired) as e:
    return {'commit': None, 'dirty': None, 'error': str(e)}
  commit = head.stdout.strip() if head.returncode == 0 else None
  dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
  return {'commit': commit, 'dirty': dirty}


def package_versions() -> dict[str, str]:
  return versions.package_versions(PACKAGES)


def file_fingerprint(path: str) -> str:
  """sha256 of the file; files over 16 MiB: of its size, first and last MiB (fast on big shards)."""
  h = hashlib.sha256()
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    if size <= _FULL_HASH_BYTES:
      h.update(f.read())
    else:
      h.update(str(size).encode())
      h.update(f.read(_CHUNK))
      f.seek(size - _CHUNK)
      h.update(f.read(_CHUNK))
  return h.hexdigest()


def directory_fingerprint(directory: str) -> dict[str, Any]:
  """A fingerprint over every file below `directory` (relative names, sizes, file fingerprints)."""
  h = hashlib.sha256()
  n, total = 0, 0
  for root, dirs, files in os.walk(directory):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      rel = os.path.relpath(path, directory)
      size = os.path.getsize(path)
      h.update(f'{rel}\0{size}\0{file_fingerprint(path)}\n'.encode())
      n, total = n + 1, total + size
  return {
    'sha256': h.hexdigest(),
    'num_files': n,
    'total_bytes': total,
    'method': 'sha256 over (relative path, size, sha256 of file or of size+first+last MiB)',
  }


def device_info() -> dict[str, Any]:
  devices = jax.devices()
  return {
    'platform': devices[0].platform,
    'device_kind': devices[0].device_kind,
    'device_count': jax.device_count(),
    'local_device_count': jax.local_device_count(),
    'process_count': jax.process_count(),
  }


def build_manifest(
  config: ml_collections.ConfigDict,
  *,
  seeds: Mapping[str, int],
  dataset: Mapping[str, Any],
  extra: Mapping[str, Any] | None = None,
) -> dict:
  return {
    'created': datetime.datetime.now(datetime.timezone.utc).isoformat(),
    'command': sys.argv,
    'config': json.loads(config.to_json_best_effort()),
    'git': git_info(),
    'packages': package_versions(),
    'devices': device_info(),
    'seeds': dict(seeds),
    'dataset': dict(dataset),
    'env': {
      k: os.environ[k]
      for k in ('XLA_FLAGS', 'TF_CUDNN_DETERMINISTIC', 'SLURM_JOB_ID')
      if k in os.environ
    },
    **(dict(extra) if extra else {}),
  }


def write_manifest(workdir: str, manifest: dict) -> str:
  """Writes `manifest.json`; when one exists (a resume), appends this run under `resumes`."""
  path = os.path.join(workdir, 'manifest.json')
  if os.path.exists(path):
    with open(path) as f:
      first = json.load(f)
    first.setdefault('resumes', []).append(manifest)
    manifest = first
  try:  # no half-written file is left behind
    atomic.write_json(path, manifest, indent=1, sort_keys=True, default=str)
  except OSError as e:
    raise OSError(e.errno, f'writing {path} failed: {e.strerror or e}', path) from e
  return path
