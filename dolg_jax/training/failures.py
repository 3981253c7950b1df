"""One closing line for a fatal error of a training run, and the process exit codes.

Exit codes of `python -m dolg_jax.main` (for schedulers and job scripts):
  0   the run finished (or had nothing left to do);
  1   it failed: the last line printed (stderr) starts with 'FAILED:' and says what failed, where
      and what to do;
  75  preempted (SIGTERM): a checkpoint of the current step was saved; rerun the same command to
      resume (EX_TEMPFAIL of sysexits.h; launch/slurm_gpu.sbatch requeues the job on it).

`describe(error)` builds the closing line. Errors raised by this package's code (bad config,
damaged checkpoint or input file, non-finite loss, ...) carry their own message naming the field or
file and the remedy; OS errors name their file; a full disk is named as such; anything else is
'unexpected', with the place it was raised, and its traceback is printed above the line.
"""

import errno
import logging
import os
import traceback

from absl import logging as absl_logging

from dolg_jax import errors

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
    return (f'FAILED: {message}. Free space on the filesystem holding {workdir} (or choose a '
            'workdir elsewhere), then rerun the same command: it resumes from the last complete '
            'checkpoint.')
  if is_expected(error):
    return f'FAILED: {errors.first_line(error, with_type=False, limit=None)}'
  return (f'FAILED: unexpected {type(error).__name__}: '
          f"{errors.first_line(error, with_type=False, limit=None)} (raised at {_origin(error)}); the "
          'traceback is above. Rerun the same command to resume from the '
          'last checkpoint; if it fails the same way, report it with that traceback.')


# Libraries whose background threads log each failure with its traceback before the main thread
# raises it: their records keep their message, without the traceback.
_QUIET_LIBRARIES = ('orbax', 'grain', 'tensorstore')


class _NoLibraryTracebacks(logging.Filter):
  """Drops the traceback (not the message) of error records logged inside _QUIET_LIBRARIES."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info and any(f'{os.sep}{name}{os.sep}' in record.pathname
                               for name in _QUIET_LIBRARIES):
      record.exc_info = None
      record.exc_text = None
    return True


def quiet_library_tracebacks() -> None:
  """Installs the filter on absl's log handler (entry points call it once)."""
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _NoLibraryTracebacks) for f in handler.filters):
    handler.addFilter(_NoLibraryTracebacks())
