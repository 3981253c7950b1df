"""Extraction settings for tests: configs/default.py's c.eval with overrides (pad off unless asked,
so a test states when it relies on padded canvases)."""

from configs import default
from dolg_jax.retrieval import extract as ex


def extract_config(**overrides) -> ex.ExtractConfig:
  return ex.from_config(default.get_config().eval, **{'pad': False, **overrides})
