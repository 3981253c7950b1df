"""Installed versions: `package_versions(names)` -> {'python': X.Y.Z, name: version, ...} for the
distributions of `names` that are installed (the others are left out). Recorded in manifests."""

import importlib.metadata
import platform
from typing import Iterable


def package_versions(names: Iterable[str]) -> dict[str, str]:
  """The Python version and the version of each installed distribution in `names`."""
  out = {'python': platform.python_version()}
  for name in names:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out
