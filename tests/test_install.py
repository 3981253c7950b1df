"""`pip install .` gives commands that work from any directory, the source tree not on sys.path:
`--help`, a shipped config by name (`--config=dolg_jax:NAME[:ARG]`) and a command's default
config; the installed package's dependencies are requirements.txt's pins.

The install is `pip install --no-deps --no-index --no-build-isolation --target DIR` of a copy of the
package's sources (no network; the dependencies are this interpreter's).
"""

import os
import shutil
import subprocess
import sys

from absl import flags
from ml_collections import config_flags
import pytest
import setuptools

from dolg_jax import cli
from tests.helpers.paths import REPO

SOURCES = ('pyproject.toml', 'README.md', 'requirements.txt', 'configs', 'dolg_jax')


def _requirements() -> list[str]:
  with open(os.path.join(REPO, 'requirements.txt')) as f:
    return [l.strip() for l in f if l.strip() and not l.startswith('#')]


@pytest.fixture(scope='module')
def site(tmp_path_factory):
  if tuple(int(p) for p in setuptools.__version__.split('.')[:2]) < (70, 1):
    pytest.skip(f'setuptools {setuptools.__version__} cannot build a wheel offline (>= 70.1 can)')
  root = tmp_path_factory.mktemp('install')
  for name in SOURCES:
    src, dst = os.path.join(REPO, name), os.path.join(root, 'src', name)
    if os.path.isdir(src):
      shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns('__pycache__'))
    else:
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      shutil.copy(src, dst)
  target = os.path.join(root, 'site')
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'pip',
      'install',
      '-q',
      '--no-deps',
      '--no-index',
      '--no-build-isolation',
      '--target',
      target,
      os.path.join(root, 'src'),
    ],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  return target


def _run(site_dir, cwd, *args):
  env = dict(os.environ, PYTHONPATH=site_dir, JAX_PLATFORMS='cpu')
  return subprocess.run(
    [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
  )


def test_the_installed_package_is_imported_and_ships_the_configs(site, tmp_path):
  proc = _run(
    site,
    tmp_path,
    '-c',
    'import sys; from dolg_jax import cli; print(cli.CONFIGS_DIR); '
    'print(*cli.shipped_configs()); print(*sys.path, sep="\\n")',
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  configs_dir, names, *path = proc.stdout.splitlines()
  assert REPO not in path  # the source tree is not on sys.path
  assert configs_dir == os.path.join(site, 'dolg_jax', 'configs')
  assert not os.path.islink(configs_dir)  # the wheel holds the files, not the repository's link
  assert set(names.split()) == set(cli.shipped_configs())


def test_the_dependencies_are_the_requirements_pins(site):
  dist_info = next(d for d in os.listdir(site) if d.endswith('.dist-info'))
  with open(os.path.join(site, dist_info, 'METADATA')) as f:
    declared = [l.split(':', 1)[1].strip() for l in f if l.startswith('Requires-Dist:')]
  assert declared == _requirements()


def test_help_from_an_empty_directory(site, tmp_path):
  proc = _run(site, tmp_path, '-m', 'dolg_jax.eval', '--help')
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert '--config' in proc.stdout and '--checkpoint' in proc.stdout


def test_a_config_by_name_from_an_empty_directory(site, tmp_path):
  # The ablation's argument reaches get_config, the config imports its base (r50, default) from
  # the installed package, and the run stops at the override it would ignore: nothing written.
  workdir = tmp_path / 'run'
  proc = _run(
    site,
    tmp_path,
    '-m',
    'dolg_jax.main',
    '--config=dolg_jax:ablation:no_local',
    f'--workdir={workdir}',
    '--config.train.num_train_steps=5',
    '--config.train.num_epochs=3',
  )
  assert proc.returncode == 1
  assert (
    proc.stderr.strip()
    .splitlines()[-1]
    .startswith('FAILED: config.train.num_epochs=3: ignored: config.train.num_train_steps=5')
  ), proc.stderr
  assert not workdir.exists()


def _config_flag(default):
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', default, flag_values=fv)
  return fv


def test_names_resolve_to_the_shipped_files_and_paths_stay_as_given():
  fv = _config_flag(None)
  shipped = os.path.join(cli.CONFIGS_DIR, 'ablation.py')
  assert cli.resolve_config_args(['p', '--config=dolg_jax:ablation:no_local'], fv) == [
    'p',
    f'--config={shipped}:no_local',
  ]
  assert cli.resolve_config_args(['p', '--config', 'dolg_jax:ablation'], fv) == [
    'p',
    '--config',
    shipped,
  ]
  assert cli.resolve_config_args(['p', '--config=configs/r101.py'], fv) == [
    'p',
    '--config=configs/r101.py',
  ]  # a path is relative to the working directory
  assert cli.resolve_config_args(['p', '--', '--config=dolg_jax:r50'], fv) == [
    'p',
    '--',
    '--config=dolg_jax:r50',
  ]  # not a flag after --


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # config_flags loads the default
def test_a_default_naming_a_shipped_config_is_that_file():
  tiny = os.path.join(cli.CONFIGS_DIR, 'tiny.py')
  for default in ('configs/tiny.py', 'dolg_jax:tiny'):
    assert cli.resolve_config_args(['p', '--config.seed=1'], _config_flag(default)) == [
      'p',
      f'--config={tiny}',
      '--config.seed=1',
    ]
  assert cli.resolve_config_args(['p', '--config=x.py'], _config_flag('configs/tiny.py')) == [
    'p',
    '--config=x.py',
  ]


def test_an_unknown_name_lists_the_shipped_ones():
  with pytest.raises(
    SystemExit,
    match=r"no shipped config 'r102'; the shipped ones are "
    r'dolg_jax:ablation, .*dolg_jax:r101',
  ):
    cli.resolve_config('dolg_jax:r102')
