"""How every command starts: absl flags, configs by name, `--help` that exits 0, shared flags.

A command (ARCHITECTURE.md) has `define_flags()`, `main(argv)` and `run()`, which ends in
`run_app(main)`: absl's `app.run` with `--config=dolg_jax:NAME[:ARG]` read as the shipped
`configs/NAME.py`, library logs quiet below `--verbosity=1` (their warnings kept, but for
`HARMLESS_WARNINGS`) and a help flag exiting 0 (a flag error stays exit 1). Commands with their own
`flags.FlagValues` (convert, data.prepare) use `help_requested` / `print_help(__doc__, fv)`.
Shared flags: `define_model_flags` (--config, --workdir, --checkpoint), `define_distributed_flags`
+ `initialize_distributed` (multi-process runs); `enable_compilation_cache(dir)` (main, eval,
index, serve). Design notes: docs/design_notes.md.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Callable, Mapping, Optional, Sequence

from absl import app
from absl import flags
from absl import logging as absl_logging
import jax
from ml_collections.config_flags import config_flags

from dolg_jax import defaults

# The flags defined here (define_*_flags) belong to the calling command: its --help lists them.
flags.disclaim_key_flags()

HELP_FLAGS = ('help', 'helpshort', 'helpfull', 'helpxml', '?')

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
CONFIGS_DIR = defaults.CONFIGS_DIR  # the repository's configs/ (a link there)
SHIPPED = 'dolg_jax:'
CONFIG_HELP = (
  'Config: a file relative to the working directory (configs/r101.py; FILE.py:ARG '
  'passes ARG to get_config) or a shipped config by name from anywhere '
  '(dolg_jax:r101, dolg_jax:ablation:no_local).'
)
CHECKPOINT_HELP = 'Released .pyth/.pth, converted dir, or one of our checkpoint step dirs.'

# Library warnings that do not mean anything is wrong: (the library's folder, the message).
HARMLESS_WARNINGS = (
  # orbax reads a step's metadata before writing it; our verification names damaged steps.
  ('orbax', re.compile(r'Metadata file does not exist: ')),
  # TFDS looks at a dataset folder before it is prepared; the missing dataset is named by us.
  ('tensorflow_datasets', re.compile(r'Variant folder .* has no dataset_info\.json')),
  # TFDS on a builder config made at run time (folder/NAME datasets are, by design).
  ('tensorflow_datasets', re.compile(r'Using custom data configuration: ')),
)


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


def shipped_configs() -> list[str]:
  """Names of the shipped configs (`dolg_jax:NAME`)."""
  return sorted(
    f[:-3] for f in os.listdir(CONFIGS_DIR) if f.endswith('.py') and not f.startswith('_')
  )


def resolve_config(value: str) -> str:
  """`dolg_jax:NAME[:ARG]` -> the shipped file's path[:ARG]; any other value unchanged.
  An unknown NAME exits naming the shipped ones."""
  if not value.startswith(SHIPPED):
    return value
  name, sep, arg = value[len(SHIPPED) :].partition(':')
  if name not in shipped_configs():
    sys.exit(
      f'FAILED: --config={value}: no shipped config {name!r}; the shipped ones are '
      f'{", ".join(SHIPPED + n for n in shipped_configs())} (or give a file path).'
    )
  return os.path.join(CONFIGS_DIR, name + '.py') + sep + arg


def _shipped_default(default: object) -> Optional[str]:
  """A config flag's default naming a shipped config (`configs/NAME.py[:ARG]` or `dolg_jax:NAME`)
  as that config's path; None for any other default."""
  if not isinstance(default, str):
    return None
  match = re.fullmatch(r'configs/(\w+)\.py(:.*)?', default)
  if match and match[1] in shipped_configs():
    default = SHIPPED + match[1] + (match[2] or '')
  return resolve_config(default) if default.startswith(SHIPPED) else None


def resolve_config_args(argv: Sequence[str], fv: flags.FlagValues = flags.FLAGS) -> list[str]:
  """argv with every config flag of `fv` given by name (`--config=dolg_jax:r101`) as its file path,
  and a config flag not given whose default is a shipped config given as that file."""
  args = list(argv)
  end = args.index('--') if '--' in args else len(args)
  for name in (n for n in list(fv) if isinstance(fv[n].parser, config_flags.ConfigFileFlagParser)):
    given = False
    for i in range(1, end):
      if args[i] in (f'--{name}', f'-{name}') and i + 1 < end:
        args[i + 1], given = resolve_config(args[i + 1]), True
      elif re.match(rf'--?{name}=', args[i]):
        flag, value = args[i].split('=', 1)
        args[i], given = f'{flag}={resolve_config(value)}', True
    default = _shipped_default(getattr(fv[name], 'default_unparsed', None))
    if not given and default:
      args.insert(1, f'--{name}={default}')
      end += 1
  return args


class _QuietLibraries(logging.Filter):
  """At absl verbosity < 1: drops records of other packages below WARNING and their
  HARMLESS_WARNINGS; records raised in this package's files always pass."""

  def filter(self, record: logging.LogRecord) -> bool:
    path = os.path.abspath(record.pathname)
    if path.startswith(PACKAGE_DIR + os.sep) or absl_logging.get_verbosity() >= 1:
      return True
    if record.levelno < logging.WARNING:
      return False
    return not any(
      f'{os.sep}{library}{os.sep}' in path and pattern.match(record.getMessage())
      for library, pattern in HARMLESS_WARNINGS
    )


def quiet_library_logs() -> None:
  """Installs the filter of library log lines on absl's handler (once)."""
  # On absl's handler (commands under app.run) and on the 'absl' logger itself (commands that
  # parse their own flags, where absl's records reach whatever handler Python has).
  for holder in (absl_logging.get_absl_handler(), logging.getLogger('absl')):
    if not any(isinstance(f, _QuietLibraries) for f in holder.filters):
      holder.addFilter(_QuietLibraries())


def run_app(main: Callable, argv: Optional[Sequence[str]] = None, **kwargs) -> None:
  """`absl.app.run(main, argv, **kwargs)` with configs by name, quiet libraries and a help request
  exiting 0 instead of absl's 1.

  With a help flag in argv the flags are parsed first (by `flags_parser` when given): absl's help
  flags print the help and exit 1, which becomes 0; a flag error met before the help flag is left
  to `app.run`, which reports it and exits 1 as without --help.
  """
  args = resolve_config_args(sys.argv if argv is None else argv)
  quiet_library_logs()
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


def define_model_flags(
  config: bool = True,
  checkpoint_help: str = CHECKPOINT_HELP,
  workdir_help: str = 'Training workdir (latest checkpoint).',
) -> None:
  """--config (locked; with `config`), --workdir and --checkpoint: which model a command uses."""
  if config:
    config_flags.DEFINE_config_file('config', None, CONFIG_HELP, lock_config=True)
  flags.DEFINE_string('workdir', None, workdir_help)
  flags.DEFINE_string('checkpoint', None, checkpoint_help)


def define_distributed_flags() -> None:
  """--coordinator_address, --num_processes, --process_id, --distributed (see
  `initialize_distributed`)."""
  flags.DEFINE_string(
    'coordinator_address', None, 'HOST:PORT of process 0 (multi-process runs outside SLURM/TPU).'
  )
  flags.DEFINE_integer('num_processes', None, 'Number of processes.')
  flags.DEFINE_integer('process_id', None, 'This process index.')
  flags.DEFINE_enum(
    'distributed',
    'auto',
    ['auto', 'on', 'off'],
    "'auto': initialise on SLURM/TPU clusters or with the explicit flags; 'on': "
    "always call jax.distributed.initialize(); 'off': never.",
  )


def cluster_detected(env: Mapping[str, str] = os.environ) -> bool:
  """True under a multi-task SLURM step or on a multi-host Cloud TPU slice."""
  if int(env.get('SLURM_NTASKS', env.get('SLURM_NPROCS', '1'))) > 1 and 'SLURM_STEP_ID' in env:
    return True
  return ',' in env.get('TPU_WORKER_HOSTNAMES', '') or 'MEGASCALE_COORDINATOR_ADDRESS' in env


def initialize_distributed(
  mode: str, coordinator: Optional[str], num_processes: Optional[int], process_id: Optional[int]
) -> None:
  """Calls jax.distributed.initialize when this is (or is asked to be) a multi-process run:
  the three explicit flags together, or `mode` 'on', or 'auto' on a detected cluster."""
  explicit = (coordinator, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise app.UsageError('--coordinator_address, --num_processes and --process_id go together.')
    # Only affects CPU devices (tests, local multi-process runs): cross-process collectives.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator, num_processes, process_id)
  elif mode == 'on' or (mode == 'auto' and cluster_detected()):
    jax.distributed.initialize()
  else:
    return
  absl_logging.info(
    'JAX distributed: process %d of %d, %d local / %d global devices.',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


def initialize_distributed_from_flags() -> None:
  """`initialize_distributed` with the flags of `define_distributed_flags`."""
  fv = flags.FLAGS
  initialize_distributed(fv.distributed, fv.coordinator_address, fv.num_processes, fv.process_id)


def required_config(argv: Sequence[str]) -> object:
  """The parsed --config; a UsageError for extra arguments or a missing --config."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if flags.FLAGS.config is None:
    raise app.UsageError('--config is required.')
  return flags.FLAGS.config


def enable_compilation_cache(cache_dir: str, min_compile_time_secs: float = 1.0) -> None:
  """JAX's persistent compilation cache in `cache_dir` ('' = off): a rerun, a resumed run or the
  next evaluation loads the executables that took >= `min_compile_time_secs` to compile."""
  if cache_dir:
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(cache_dir))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', min_compile_time_secs)
