"""How every command starts: absl flags, and `--help` that prints the command's flags and exits 0.

A command (ARCHITECTURE.md) is a module with `define_flags()`, `main(argv)` and `run()`.
- Commands on absl's global FLAGS end `run()` with `cli.run_app(main)` (`app.run` arguments pass
  through): absl prints the module docstring and the module's flags for --help / --helpshort /
  --helpfull / --helpxml / -? and exits 1; `run_app` makes that exit 0, as a help request is not
  a failure (a flag error stays exit 1).
- Commands that parse `argv` into their own `flags.FlagValues` (convert, data.prepare) start
  `main` with `if cli.help_requested(argv): return cli.print_help(__doc__, fv)`.
- Commands that compile (main, eval, index) call `enable_compilation_cache(dir)` first, with their
  config's `train.xla_cache_dir` / `eval.xla_cache_dir` ('' = off).
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Optional, Sequence

from absl import app
from absl import flags
import jax

HELP_FLAGS = ('help', 'helpshort', 'helpfull', 'helpxml', '?')


def help_requested(argv: Sequence[str]) -> bool:
  """Whether argv (program name first) asks for help (before a `--` that ends the flags)."""
  for arg in argv[1:]:
    if arg == '--':
      return False
    if arg.startswith('-') and arg.lstrip('-') in HELP_FLAGS:
      return True
  return False


def print_help(doc: Optional[str], fv: flags.FlagValues) -> int:
  """Prints `doc` and every flag of `fv` with its help and default to stdout; returns 0."""
  if doc:
    print(doc.strip())
    print()
  print('flags:')
  print(fv.get_help(include_special_flags=False))
  return 0


def run_app(main: Callable, argv: Optional[Sequence[str]] = None, **kwargs) -> None:
  """`absl.app.run(main, argv, **kwargs)`, with a help request exiting 0 instead of absl's 1.

  With a help flag in argv the flags are parsed first (by `flags_parser` when given): absl's help
  flags print the help and exit 1, which becomes 0; a flag error met before the help flag is left
  to `app.run`, which reports it and exits 1 as without --help.
  """
  args = list(sys.argv if argv is None else argv)
  if help_requested(args):
    app.define_help_flags()
    parser = kwargs.get('flags_parser') or flags.FLAGS
    try:
      parser(args)
    except SystemExit as e:
      sys.exit(0 if e.code == 1 else e.code)
    except flags.Error:
      pass
  app.run(main, argv=args, **kwargs)


def enable_compilation_cache(cache_dir: str, min_compile_time_secs: float = 1.0) -> None:
  """JAX's persistent compilation cache in `cache_dir` ('' = off): a rerun, a resumed run or the
  next evaluation loads the executables that took >= `min_compile_time_secs` to compile."""
  if cache_dir:
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(cache_dir))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', min_compile_time_secs)
