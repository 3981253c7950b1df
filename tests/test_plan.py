"""`python -m dolg_jax.plan`: the ahead-of-time plan's JSON on CPU, --max_batch's bisection, and
the one-line error for --topology without libtpu."""

import importlib.util
import json
import subprocess
import sys

import jax
import pytest

from configs import tiny
from dolg_jax.training import plan as plan_lib

from tests.helpers import train_testlib as tl

KEYS = ('flops_per_step', 'peak_memory_bytes_per_device', 'argument_bytes_per_device',
        'device_kind', 'device_memory_bytes', 'fits')


def _plan(*flags, check=True, config='configs/tiny.py'):
  proc = subprocess.run([sys.executable, '-m', 'dolg_jax.plan', f'--config={config}', *flags],
                        cwd=tl.REPO, env=tl.env(), capture_output=True, text=True, timeout=600)
  if check:
    assert proc.returncode == 0, tl.explain(proc)
    lines = [l for l in proc.stdout.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stdout   # One JSON object and nothing else on stdout.
    return json.loads(lines[0])
  return proc


def test_plan_tiny_on_cpu():
  out = _plan('--max_batch')
  assert all(k in out for k in KEYS), out
  assert out['device_kind'] == 'cpu' and out['device_memory_bytes'] is None and out['fits'] is None
  assert out['flops_per_step'] > 0 and out['peak_memory_bytes_per_device'] > 0
  # The global pre-optimisation program's FLOPs: within a few percent of the compiled ones.
  assert out['flops_per_step_unoptimised'] == pytest.approx(out['flops_per_step'], rel=0.1)
  # Params + optimizer state: float32 params and one SGD momentum buffer the same size.
  assert out['params_bytes_per_device'] == 4 * out['num_params']
  assert out['optimizer_bytes_per_device'] == out['params_bytes_per_device']
  assert out['argument_bytes_per_device'] >= 2 * out['params_bytes_per_device']
  assert out['peak_memory_bytes_per_device'] > out['argument_bytes_per_device']
  assert out['batch_bytes_per_device'] == 8 * 64 * 64 * 3 + 8 * 4
  # --max_batch without a known device memory says why instead of guessing.
  assert out['max_batch_per_device'] is None and 'unknown' in out['max_batch_note']


def test_plan_r50_at_a_reduced_size_on_cpu():
  """The paper's R50 (multi-atrous, the 81,313-class head) at 64 px, batch 2: the JSON's FLOPs
  grow with the image area and the state holds R50's parameters."""
  out = _plan('--config.data.image_size=64', '--config.train.global_batch_size=2',
              config='configs/r50.py')
  assert all(k in out for k in KEYS), out
  assert 87_000_000 < out['num_params'] < 88_000_000   # R50 DOLG + multi-atrous + 81,313 x 512 head
  assert out['optimizer_bytes_per_device'] == out['params_bytes_per_device'] == 4 * out['num_params']
  # Forward + backward of R50-DOLG at 64 px: about 3 x 64^2/512^2 x 203 GFLOP per image.
  assert 2e9 < out['flops_per_step'] / 2 < 8e9, out['flops_per_step']


@pytest.mark.parametrize('budget, accum, expected', [
    (50_000, 1, 45),     # above the configured batch: doubling 8, 16, 32, 64 then bisection
    (12_000, 1, 7),      # the configured batch does not fit: halving, then bisection
    (4_500, 1, 0),       # nothing fits
    (50_000, 4, 44),     # multiples of grad_accum_steps only
    (10**9, 1, 100),     # everything up to the limit fits
])
def test_max_batch_bisection(monkeypatch, budget, accum, expected):
  """The search on a stand-in plan whose peak is 5,000 + 1,000 x batch bytes; batches above 60
  per device fail to compile with XLA's out-of-memory error, as TPU compiles do."""
  calls = []

  def fake_plan(config, devices, *, global_batch, memory_bytes):
    calls.append(global_batch)
    if global_batch > 60 and memory_bytes < 10**9:
      raise RuntimeError('RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm')
    peak = 5_000 + 1_000 * global_batch
    return {'fits': peak <= memory_bytes, 'peak_memory_bytes_per_device': peak}

  monkeypatch.setattr(plan_lib, 'plan', fake_plan)
  config = tiny.get_config()
  config.train.grad_accum_steps = accum
  out = plan_lib.max_batch(config, jax.devices()[:1], memory_bytes=budget, limit=100)
  assert out['max_batch_per_device'] == expected, out
  assert len(calls) == len(set(calls)) <= 12           # each batch compiled at most once
  assert all(c % accum == 0 for c in calls)
  assert [p['batch_per_device'] for p in out['max_batch_probes']] == calls


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is not None, reason='libtpu installed')
def test_topology_without_libtpu_is_one_clear_line():
  proc = _plan('--topology=v5e:2x2', check=False)
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1].startswith('ERROR: --topology=v5e:2x2 needs libtpu')
