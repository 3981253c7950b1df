"""`python -m <command> --help` exits 0 and lists the command's flags, for every command.

Commands are found, not listed: every module under dolg_jax/ with an `if __name__ == '__main__':`
block or a `define_flags` function (so one added later is covered). Each must follow the
convention of ARCHITECTURE.md (`define_flags`, `main`, `run`). The flags a command must list are
read from its source (the names of its `DEFINE_*` calls), not from absl.

Speed: one subprocess imports every command once, then forks a child per command that runs it as
`__main__` with `--help` (as `python -m` does, without paying the imports again). A flag error
given before --help still exits 1.
"""

import ast
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from tests.helpers.paths import REPO

PACKAGE = os.path.join(REPO, 'dolg_jax')


def _is_main_guard(node: ast.stmt) -> bool:
  return (
    isinstance(node, ast.If)
    and isinstance(node.test, ast.Compare)
    and isinstance(node.test.left, ast.Name)
    and node.test.left.id == '__name__'
    and any(isinstance(c, ast.Constant) and c.value == '__main__' for c in node.test.comparators)
  )


def _flag_names(tree: ast.Module) -> list[str]:
  """First argument (or name=) of every DEFINE_* call: the flags the command defines."""
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Call):
      func = node.func
      fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, 'id', '')
      if not fname.startswith('DEFINE_') or fname == 'DEFINE_flag':
        continue
      arg = (
        node.args[0]
        if node.args
        else next((k.value for k in node.keywords if k.arg == 'name'), None)
      )
      if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        names.append(arg.value)
  return names


def discover() -> dict[str, dict]:
  """{module: {'path', 'functions', 'flags'}} of every command module of the package."""
  found = {}
  for dirpath, _, files in os.walk(PACKAGE):
    for f in sorted(files):
      if not f.endswith('.py'):
        continue
      path = os.path.join(dirpath, f)
      tree = ast.parse(open(path).read(), path)
      functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
      if any(_is_main_guard(n) for n in tree.body) or 'define_flags' in functions:
        module = os.path.relpath(path, REPO)[:-3].replace(os.sep, '.').removesuffix('.__init__')
        found[module] = {'path': path, 'functions': functions, 'flags': _flag_names(tree)}
  return found


COMMANDS = discover()
# A flag error before --help is still an error (exit 1), not a help request.
BAD_FLAG = 'dolg_jax.tools.bench_rerank --db=abc'

# One process: import everything once, then fork one child per command running it as __main__.
_DRIVER = textwrap.dedent('''
  import importlib, json, os, runpy, sys, tempfile, warnings
  cases = sys.argv[1:]                # 'module' or 'module --flag=value ...' (then --help)
  for case in cases:
    importlib.import_module(case.split()[0])   # Commands define their flags at entry, not import.
  results = {}
  for case in cases:
    m, *extra = case.split()
    out = tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:
      os.dup2(out.fileno(), 1)
      os.dup2(out.fileno(), 2)
      warnings.simplefilter('ignore')  # runpy: "found in sys.modules ... prior to execution"
      code = 0
      try:
        sys.argv = [m, *extra, '--help']
        runpy.run_module(m, run_name='__main__', alter_sys=True)
      except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
      except BaseException as e:  # noqa: B036
        import traceback
        traceback.print_exc()
        code = 99
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(code)
    _, status = os.waitpid(pid, 0)
    out.seek(0)
    results[case] = {'rc': os.waitstatus_to_exitcode(status),
                     'output': out.read().decode(errors='replace')}
  print('RESULTS ' + json.dumps(results))
''')


@pytest.fixture(scope='module')
def helps():
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    PYTHONPATH=os.pathsep.join([REPO, os.environ.get('PYTHONPATH', '')]),
  )
  proc = subprocess.run(
    [sys.executable, '-c', _DRIVER, *sorted(COMMANDS), BAD_FLAG],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith('RESULTS '))
  return json.loads(line[len('RESULTS ') :])


def test_the_known_commands_are_found():
  # A sample that must be there (the discovery itself covers commands added later).
  assert {
    'dolg_jax.main',
    'dolg_jax.eval',
    'dolg_jax.convert',
    'dolg_jax.data.prepare',
    'dolg_jax.study',
    'dolg_jax.tools.bench_eval',
    'dolg_jax.tools.accelerator_check',
  } <= set(COMMANDS)


@pytest.mark.parametrize('module', sorted(COMMANDS))
def test_help_exits_0_and_lists_the_flags(module, helps):
  info = COMMANDS[module]
  missing = {'define_flags', 'main', 'run'} - info['functions']
  assert not missing, (
    f'{module}: a command defines define_flags(), main(argv) and run() '
    f'(ARCHITECTURE.md); missing {sorted(missing)}'
  )
  res = helps[module]
  assert res['rc'] == 0, f'{module} --help exited {res["rc"]}:\n{res["output"][-3000:]}'
  out = res['output']
  # absl's listing: one `  --name: help` (`--[no]name:` for booleans) line per flag.
  listed = lambda name: re.search(rf'^\s+--(\[no\])?{name}:', out, re.MULTILINE)
  absent = [n for n in info['flags'] if not listed(re.escape(n))]
  assert not absent, f'{module} --help does not list {absent}:\n{out[-3000:]}'
  if not info['flags']:  # Flags defined elsewhere (a shared helper): at least some are listed.
    assert listed(r'[\w.]+'), f'{module} --help lists no flag:\n{out[-3000:]}'
  assert 'Unknown command line flag' not in out and 'Traceback' not in out


def test_a_flag_error_before_help_still_exits_1(helps):
  res = helps[BAD_FLAG]
  assert res['rc'] == 1 and 'FATAL Flags parsing error' in res['output'], res
