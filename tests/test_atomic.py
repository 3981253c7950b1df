"""dolg_jax.atomic (one atomic-write helper) and dolg_jax.progress (tqdm-formatted lines)."""

import io
import json
import os
import stat

import pytest

from dolg_jax import atomic
from dolg_jax import progress


def test_write_replaces_whole_file_and_leaves_no_temporary(tmp_path):
  path = str(tmp_path / 'a.json')
  atomic.write_json(path, {'x': 1}, indent=1)
  atomic.write_json(path, {'x': 2}, indent=1)
  assert json.load(open(path)) == {'x': 2}
  assert os.listdir(tmp_path) == ['a.json']
  umask = os.umask(0)
  os.umask(umask)
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask  # not mkstemp's 0o600


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
  path = str(tmp_path / 'a.bin')
  atomic.write_bytes(path, b'old')
  with pytest.raises(RuntimeError):
    with atomic.writing(path) as f:
      f.write(b'half')
      raise RuntimeError('killed')
  assert open(path, 'rb').read() == b'old' and os.listdir(tmp_path) == ['a.bin']


def test_progress_line_has_rate_and_eta():
  p = progress.Progress(10, 'x {n}/{total} ({percentage:.1f}%) {rate_noinv:.1f}/s ETA {remaining}')
  assert p.line() == 'x 0/10 (0.0%) 0.0/s ETA ?'
  p.advance(5)
  line = p.line()
  assert line.startswith('x 5/10 (50.0%) ') and 'ETA ' in line and '?' not in line


def test_unknown_total_and_the_final_line_on_close():
  out = io.StringIO()
  printer = progress.Printer(progress.Progress(None, 'got {n}'), every=3600.0, stream=out)
  printer.update(2)  # the first update prints (nothing printed yet), the next waits `every`
  printer.update(3)
  assert printer.progress.eta_s() != printer.progress.eta_s()  # nan: no total, no ETA
  printer.close()
  printer.close()  # once
  assert out.getvalue().splitlines() == ['got 2', 'got 5']
