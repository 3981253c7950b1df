"""Train DOLG: python -m dolg_jax.main --config=configs/r101.py --workdir=DIR [--config.a.b=v ...]

Parses flags, starts multi-host JAX when needed and calls `train_and_evaluate(config, workdir)`.
`--config` is a file or a shipped config by name (`--config=dolg_jax:r101`, from any directory).
The config is locked: an override of a missing field, of the wrong type, or one the run would
ignore (config_check.check_overrides) is an error naming it.

Exit codes: 0 finished; 1 failed (the last line printed starts with 'FAILED:' and says what failed,
where and what to do); 75 preempted by SIGTERM after saving a checkpoint (rerun to resume); see
docs/faults.md.

Multi-host: on SLURM (srun with several tasks) and on Cloud TPU pods `jax.distributed.initialize()`
detects the cluster itself; elsewhere pass --coordinator_address=HOST:PORT --num_processes=N
--process_id=I on every process (see launch/).
"""

import os
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from dolg_jax import cli
from dolg_jax.training import config_check
from dolg_jax.training import determinism
from dolg_jax.training import failures
from dolg_jax.training import loop
from dolg_jax.training import preemption

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command-line flags (at entry only, so importing this module defines none)."""
  config_flags.DEFINE_config_file('config', None, cli.CONFIG_HELP, lock_config=True)
  flags.DEFINE_string(
    'workdir',
    None,
    'Checkpoints, metrics.jsonl, TensorBoard, manifest.json. '
    'Training resumes from it automatically.',
  )
  cli.define_distributed_flags()


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing; a --config.<path> override of a missing field exits naming the field."""
  try:
    return flags.FLAGS(argv)
  except flags.IllegalFlagValueError as e:
    sys.exit(f'FAILED: {str(e).splitlines()[0]} (check the value\'s type against the config)')
  except (KeyError, AttributeError) as e:
    message = e
    while isinstance(message, BaseException) and message.args:
      message = message.args[0]
    message = str(message)
    for arg in argv[1:]:
      if arg.startswith('--config.'):
        path = arg[len('--config.') :].split('=', 1)[0]
        if any(f"'{part}'" in message for part in path.split('.')):
          hint = message.split('\n', 1)[1] if '\n' in message else ''
          sys.exit(
            f'FAILED: unknown config field {path!r} in {arg!r}: the config is locked, '
            f'so overrides must name existing fields. {hint}'.rstrip()
          )
    raise


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.workdir is None or FLAGS.config is None:
    raise app.UsageError('--config and --workdir are required.')
  config = FLAGS.config
  try:  # before anything is written: an override the run would ignore
    config_check.check_overrides(config, config_flags.get_override_values(FLAGS['config']))
  except config_check.ConfigError as e:
    _exit(failures.describe(e, FLAGS.workdir), failures.EXIT_FAILED)
  preemption.catch_early_sigterm()  # A SIGTERM while starting still saves and exits 75.
  determinism.apply(config.train.deterministic, at_entry=True)  # Before the XLA backend starts.
  cli.enable_compilation_cache(config.train.xla_cache_dir)  # a resumed run loads its executables
  cli.initialize_distributed_from_flags()
  failures.quiet_library_tracebacks()
  try:
    result = loop.train_and_evaluate(config, FLAGS.workdir)
  except Exception as e:  # noqa: BLE001  # every fatal error ends in one line
    if failures.is_expected(e) or failures.is_disk_full(e):
      logging.debug('%s', ''.join(traceback.format_exception(e)))
    else:
      traceback.print_exception(e)
    _exit(failures.describe(e, FLAGS.workdir), failures.EXIT_FAILED)
  if result.get('preempted'):
    _exit(None, failures.EXIT_PREEMPTED)


def _exit(line: str | None, code: int) -> None:
  """Prints `line` last and exits at once: background threads of libraries (orbax's async
  machinery, grain) get no chance to print secondary tracebacks during interpreter shutdown."""
  logging.flush()
  sys.stdout.flush()
  if line:
    print(line, file=sys.stderr)
  sys.stderr.flush()
  os._exit(code)


def run() -> None:
  define_flags()
  cli.run_app(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
