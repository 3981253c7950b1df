"""The package's layering (ARCHITECTURE.md): every module imports only its own layer or lower ones,
at module level, and never the repository's `configs` or `tests` packages."""

import ast
import os

import pytest

from tests.helpers.paths import REPO

# Lowest first. A module may import modules of its own layer or of a lower one.
LAYERS = (
  (
    'dolg_jax.sharding',
    'dolg_jax.models',
    'dolg_jax.checksums',
    'dolg_jax.errors',
    'dolg_jax.profiling',
    'dolg_jax.cli',
    'dolg_jax.versions',
    'dolg_jax.atomic',
    'dolg_jax.progress',
    'dolg_jax.config_rules',
    'dolg_jax.defaults',
  ),
  ('dolg_jax.weights', 'dolg_jax.data'),
  ('dolg_jax.data.synthetic', 'dolg_jax.pretrained'),
  ('dolg_jax.retrieval', 'dolg_jax.collection'),
  ('dolg_jax.training',),
  (
    'dolg_jax.main',
    'dolg_jax.eval',
    'dolg_jax.export',
    'dolg_jax.convert',
    'dolg_jax.demo',
    'dolg_jax.plan',
    'dolg_jax.study',
    'dolg_jax.index',
    'dolg_jax.search',
    'dolg_jax.tools',
    'dolg_jax.serve',
    'dolg_jax.publish',
  ),
)
# Function-level imports that remain, with the reason (see ARCHITECTURE.md).
ALLOWED_LOCAL_IMPORTS = {
  ('dolg_jax.weights.torch_format', 'torch')  # optional: only .pth/.pyth reading needs torch
}


def layer_of(module: str) -> int:
  if module == 'dolg_jax':  # the package's __init__ (imports nothing)
    return 0
  best = None
  for i, prefixes in enumerate(LAYERS):
    for p in prefixes:
      if (module == p or module.startswith(p + '.')) and (best is None or len(p) > best[1]):
        best = (i, len(p))
  assert best is not None, f'{module} is in no layer: add it to LAYERS and ARCHITECTURE.md'
  return best[0]


def _modules():
  root = os.path.join(REPO, 'dolg_jax')
  for dirpath, _, files in os.walk(root):
    for f in sorted(files):
      if f.endswith('.py'):
        rel = os.path.relpath(os.path.join(dirpath, f), REPO)[:-3].replace(os.sep, '.')
        yield rel.removesuffix('.__init__'), os.path.join(dirpath, f)


def _imports(path: str):
  """(imported module, is_module_level) of every import statement in the file."""
  tree = ast.parse(open(path).read(), path)
  local = set()  # import nodes inside a function or class body
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
      local.update(id(n) for n in ast.walk(node) if n is not node)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        yield a.name, id(node) not in local
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      for a in node.names:
        name = f'{node.module}.{a.name}' if node.module == 'dolg_jax' else node.module
        yield name, id(node) not in local


MODULES = sorted(_modules())


@pytest.mark.parametrize('module, path', MODULES, ids=[m for m, _ in MODULES])
def test_imports_only_lower_layers(module, path):
  own = layer_of(module)
  for name, top_level in _imports(path):
    assert name.split('.')[0] not in ('configs', 'tests'), (
      f'{module} imports {name}: the package must not depend on the repository\'s configs/tests'
    )
    if not top_level:
      assert (module, name) in ALLOWED_LOCAL_IMPORTS, (
        f'{module} imports {name} inside a function: import it at module level (a cycle means '
        'the layering is wrong)'
      )
    if name.startswith('dolg_jax'):
      assert layer_of(name) <= own, (
        f'{module} (layer {own}) imports {name} (layer {layer_of(name)})'
      )


def test_layer_table_catches_an_upward_import():
  assert layer_of('dolg_jax.training.loop') > layer_of('dolg_jax.retrieval.evaluate')
  assert layer_of('dolg_jax.data.synthetic.demo_data') > layer_of('dolg_jax.data.gldv2')
  assert layer_of('dolg_jax.eval') > layer_of('dolg_jax.training.loop')
