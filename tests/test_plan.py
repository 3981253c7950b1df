"""`python -m dolg_jax.plan`: the ahead-of-time plan's JSON on CPU, --max_batch's bisection, and
the one-line error for --topology without libtpu."""

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.helpers import train_testlib as tl

KEYS = ('flops_per_step', 'peak_memory_bytes_per_device', 'argument_bytes_per_device',
        'device_kind', 'device_memory_bytes', 'fits')


def _plan(*flags, check=True):
  proc = subprocess.run([sys.executable, '-m', 'dolg_jax.plan', '--config=configs/tiny.py', *flags],
                        cwd=tl.REPO, env=tl.env(), capture_output=True, text=True, timeout=600)
  if check:
    assert proc.returncode == 0, tl.explain(proc)
    lines = [l for l in proc.stdout.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stdout   # One JSON object and nothing else on stdout.
    return json.loads(lines[0])
  return proc


def test_plan_tiny_on_cpu():
  out = _plan()
  assert all(k in out for k in KEYS), out
  assert out['device_kind'] == 'cpu' and out['device_memory_bytes'] is None and out['fits'] is None
  assert out['flops_per_step'] > 0 and out['peak_memory_bytes_per_device'] > 0
  # The loop logs the unoptimised program's FLOPs: within a few percent of the compiled ones.
  assert out['flops_per_step_unoptimised'] == pytest.approx(out['flops_per_step'], rel=0.1)
  # Params + optimizer state: float32 params and one SGD momentum buffer the same size.
  assert out['params_bytes_per_device'] == 4 * out['num_params']
  assert out['optimizer_bytes_per_device'] == out['params_bytes_per_device']
  assert out['argument_bytes_per_device'] >= 2 * out['params_bytes_per_device']
  assert out['peak_memory_bytes_per_device'] > out['argument_bytes_per_device']
  assert out['batch_bytes_per_device'] == 8 * 64 * 64 * 3 + 8 * 4


def test_max_batch_bisects_to_the_memory_budget():
  """A budget between the peaks of batch 8 and 16: doubling from 8 fails at 16, bisection finds
  the largest batch in between whose compiled peak fits, and the probes agree with it."""
  out = _plan('--max_batch', '--device_memory_bytes=14000000', '--max_batch_limit=64')
  best, probes = out['max_batch_per_device'], out['max_batch_probes']
  assert out['fits'] is True and 8 <= best < 16, out
  fitting = [p['batch_per_device'] for p in probes if p['fits']]
  failing = [p['batch_per_device'] for p in probes if not p['fits']]
  assert max(fitting) == best and min(failing) == best + 1, probes
  for p in probes:   # Peak memory grows with the batch.
    assert p['fits'] == (p['peak_memory_bytes_per_device'] <= 14000000)


def test_max_batch_says_why_without_device_memory():
  out = _plan('--max_batch')
  assert out['max_batch_per_device'] is None and 'unknown' in out['max_batch_note']


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is not None, reason='libtpu installed')
def test_topology_without_libtpu_is_one_clear_line():
  proc = _plan('--topology=v5e:2x2', check=False)
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1].startswith('ERROR: --topology=v5e:2x2 needs libtpu')
