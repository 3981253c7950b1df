"""One closing line for a fatal error of a run, and the process exit codes.

Exit codes of `python -m dolg_jax.main` (docs/faults.md): EXIT_OK 0 finished; EXIT_FAILED 1, the
last line printed (stderr) starts with 'FAILED:'; EXIT_PREEMPTED 75 (EX_TEMPFAIL), SIGTERM after a
checkpoint of the current step was saved: rerun to resume (launch/slurm_gpu.sbatch requeues).
`describe(error, workdir)` builds the line: an expected error's own message (raised by this
package, or an OSError naming its file), a full disk named as such with the remedy, anything else
'unexpected' with the place it was raised. `exit_in_one_line` / `call_or_exit` end the other
commands (eval, export, index, search, publish) that way; `quiet_library_tracebacks` drops
libraries' duplicate tracebacks.
"""

import errno
import logging
import os
import sys
import threading
import traceback
from typing import Callable, NoReturn, TypeVar

from absl import logging as absl_logging

from dolg_jax import errors

_T = TypeVar('_T')

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_PREEMPTED = 75

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _origin(error: BaseException) -> str:
  tb = traceback.extract_tb(error.__traceback__)
  if not tb:
    return 'unknown place'
  frame = tb[-1]
  return f'{os.path.relpath(frame.filename)}:{frame.lineno} in {frame.name}'


def is_disk_full(error: BaseException) -> bool:
  """True when `error` or one of its causes is ENOSPC / EDQUOT (also inside library messages)."""
  seen = set()
  e = error
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if 'No space left on device' in str(e) or 'Disk quota exceeded' in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


def is_expected(error: BaseException) -> bool:
  """True for errors this project raises on purpose (their message names the field or file and
  the remedy, so the traceback is noise) and for OS errors (which name their file)."""
  if not str(error).strip():
    return False
  if isinstance(error, OSError):
    return True
  tb = traceback.extract_tb(error.__traceback__)
  return bool(tb) and os.path.abspath(tb[-1].filename).startswith(_PACKAGE_DIR + os.sep)


def describe(error: BaseException, workdir: str) -> str:
  """The last line a user sees for `error` (one line, no traceback)."""
  if is_disk_full(error):
    message = errors.first_line(error, with_type=False, limit=None)
    if 'No space left' not in message and 'quota' not in message:
      message = f'no space left on the device: {message}'
    return (
      f'FAILED: {message}. Free space on the filesystem holding {workdir} (or choose a '
      'workdir elsewhere), then rerun the same command: it resumes from the last complete '
      'checkpoint.'
    )
  if is_expected(error):
    return f'FAILED: {errors.first_line(error, with_type=False, limit=None)}'
  return (
    f'FAILED: unexpected {type(error).__name__}: '
    f"{errors.first_line(error, with_type=False, limit=None)} "
    f'(raised at {_origin(error)}); the traceback is above.'
    ' Rerun the same command to resume from the '
    'last checkpoint; if it fails the same way, report it with that traceback.'
  )


# Libraries whose background threads log each failure with its traceback before the main thread
# raises it: their records keep their message, without the traceback.
_QUIET_LIBRARIES = ('orbax', 'grain', 'tensorstore')


class _NoLibraryTracebacks(logging.Filter):
  """Drops the traceback (not the message) of error records logged inside _QUIET_LIBRARIES."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info and any(
      f'{os.sep}{name}{os.sep}' in record.pathname for name in _QUIET_LIBRARIES
    ):
      record.exc_info = None
      record.exc_text = None
    return True


def _is_secondary(error: BaseException | None) -> bool:
  """An async save's callback that ran after its event loop was closed: TensorStore reports it
  through Python's hooks once the real error (e.g. ENOSPC) has already stopped the save."""
  return isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'


def quiet_library_tracebacks() -> None:
  """Installs the filter on absl's log handler and drops the secondary 'Event loop is closed'
  tracebacks that background threads print through sys.excepthook, sys.unraisablehook or
  threading.excepthook (entry points call it once)."""
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _NoLibraryTracebacks) for f in handler.filters):
    handler.addFilter(_NoLibraryTracebacks())
  if getattr(sys.excepthook, '_dolg_quiet', False):
    return
  excepthook, unraisablehook, thread_hook = (
    sys.excepthook,
    sys.unraisablehook,
    threading.excepthook,
  )

  def quiet_excepthook(exc_type, exc, tb):
    if not _is_secondary(exc):
      excepthook(exc_type, exc, tb)

  def quiet_unraisablehook(unraisable):
    if not _is_secondary(unraisable.exc_value):
      unraisablehook(unraisable)

  def quiet_thread_hook(args):
    if not _is_secondary(args.exc_value):
      thread_hook(args)

  quiet_excepthook._dolg_quiet = True
  sys.excepthook, sys.unraisablehook = quiet_excepthook, quiet_unraisablehook
  threading.excepthook = quiet_thread_hook


def exit_in_one_line(error: BaseException, where: str | None) -> NoReturn:
  """How a command (eval, export, index, search) ends on a fatal `error`: its traceback only when
  it is not an expected one (bad input, full disk), then `describe`'s one line naming `where` (the
  output or input path) on stderr, exit EXIT_FAILED."""
  if not (is_expected(error) or is_disk_full(error)):
    traceback.print_exception(error)
  print(describe(error, where), file=sys.stderr)
  sys.exit(EXIT_FAILED)


def call_or_exit(fn: Callable[[], _T], where: str | None) -> _T:
  """`fn()`; any exception ends the command in one line (`exit_in_one_line`)."""
  try:
    return fn()
  except Exception as e:  # noqa: BLE001  # every fatal error ends in one line
    exit_in_one_line(e, where)
