"""Default values have one source, the shipped `configs/default.py` (installed as dolg_jax/configs).

`model_defaults()` is its `c.model` section as a dict; `shipped_config(name)` any shipped config
(`configs/NAME.py`), a fresh copy. Libraries that must work without a config
(a released checkpoint read by `dolg_jax.pretrained.load`, a partial model section) fill in from
here, never from defaults of their own.
"""

import functools
import importlib.util
import os

import ml_collections

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs')


@functools.lru_cache(maxsize=None)
def _load(name: str) -> ml_collections.ConfigDict:
  path = os.path.join(CONFIGS_DIR, name + '.py')
  spec = importlib.util.spec_from_file_location(f'dolg_jax_shipped_config_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def shipped_config(name: str) -> ml_collections.ConfigDict:
  """`configs/NAME.py`'s get_config(), a copy the caller may change."""
  return _load(name).copy_and_resolve_references()


def model_defaults() -> dict:
  """{field: default} of the model section (`c.model`)."""
  return dict(_load('default').model.to_dict())
