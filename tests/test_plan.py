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

KEYS = (
  'flops_per_step',
  'peak_memory_bytes_per_device',
  'argument_bytes_per_device',
  'device_kind',
  'device_memory_bytes',
  'fits',
)


def _plan(*flags, check=True, config='configs/tiny.py'):
  proc = subprocess.run(
    [sys.executable, '-m', 'dolg_jax.plan', f'--config={config}', *flags],
    cwd=tl.REPO,
    env=tl.env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  if check:
    assert proc.returncode == 0, tl.explain(proc)
    lines = [l for l in proc.stdout.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stdout  # One JSON object and nothing else on stdout.
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
  out = _plan(
    '--config.data.image_size=64', '--config.train.global_batch_size=2', config='configs/r50.py'
  )
  assert all(k in out for k in KEYS), out
  assert 87_000_000 < out['num_params'] < 88_000_000  # R50 DOLG + multi-atrous + 81,313 x 512 head
  assert (
    out['optimizer_bytes_per_device'] == out['params_bytes_per_device'] == 4 * out['num_params']
  )
  # Forward + backward of R50-DOLG at 64 px: about 3 x 64^2/512^2 x 203 GFLOP per image.
  assert 2e9 < out['flops_per_step'] / 2 < 8e9, out['flops_per_step']


@pytest.mark.parametrize(
  'budget, accum, expected',
  [
    (50_000, 1, 45),  # above the configured batch: doubling 8, 16, 32, 64 then bisection
    (12_000, 1, 7),  # the configured batch does not fit: halving, then bisection
    (4_500, 1, 0),  # nothing fits
    (50_000, 4, 44),  # multiples of grad_accum_steps only
    (10**9, 1, 100),  # everything up to the limit fits
  ],
)
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
  assert len(calls) == len(set(calls)) <= 12  # each batch compiled at most once
  assert all(c % accum == 0 for c in calls)
  assert [p['batch_per_device'] for p in out['max_batch_probes']] == calls


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is not None, reason='libtpu installed')
def test_topology_without_libtpu_is_one_clear_line():
  proc = _plan('--topology=v5e:2x2', check=False)
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1].startswith('ERROR: --topology=v5e:2x2 needs libtpu')


# The collectives of the compiled step, on 8 fake CPU devices: global BatchNorm synchronises each
# BN layer's statistics (forward and backward) across the data axis, per-device BN only the
# gradients. The script prints both plans and the sum over the parsed ops of each program.
_COLLECTIVES_SCRIPT = r'''
import json
from configs import tiny
from dolg_jax.training import plan as plan_lib
texts = []
_orig = plan_lib.collectives
plan_lib.collectives = lambda text: (texts.append(text), _orig(text))[1]
out = {}
for mode in ('global', 'per_device'):
  c = tiny.get_config()
  c.train.global_batch_size = 16
  c.train.bn_mode = mode
  p = plan_lib.plan(c)
  ops = plan_lib.collective_ops(texts[-1])
  out[mode] = {'plan': p, 'n_ops': sum(o['times'] for o in ops),
               'op_bytes': sum(plan_lib.shape_bytes(o['shape']) * o['times'] for o in ops)}
print(json.dumps(out))
'''


def test_plan_reports_collectives_global_vs_per_device_bn():
  proc = subprocess.run(
    [sys.executable, '-c', _COLLECTIVES_SCRIPT],
    cwd=tl.REPO,
    timeout=600,
    env=tl.env(XLA_FLAGS='--xla_force_host_platform_device_count=8'),
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 0, tl.explain(proc)
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  g, d = out['global']['plan'], out['per_device']['plan']
  for mode in out.values():
    p = mode['plan']
    assert set(p['collectives']) == set(plan_lib.COLLECTIVE_KINDS)
    assert sum(v['count'] for v in p['collectives'].values()) == mode['n_ops']
    assert (
      p['collective_bytes_per_device_step']
      == mode['op_bytes']
      == sum(v['bytes'] for v in p['collectives'].values())
    )
    # At least the gradients (every parameter, float32, data-parallel) are all-reduced.
    assert p['collectives']['all-reduce']['bytes'] >= 4 * p['num_params'] * 0.9, p['collectives']
  assert g['bn_mode'] == 'global' and d['bn_mode'] == 'per_device'
  ga, da = g['collectives']['all-reduce'], d['collectives']['all-reduce']
  assert da['bytes'] < ga['bytes'] and da['count'] < ga['count'], (ga, da)
  assert g['flops_per_step'] == pytest.approx(d['flops_per_step'], rel=0.1)


_HLO = '''
HloModule m, entry_computation_layout={()->f32[]}

%body.1 (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ar.1 = f32[8]{0} all-reduce(%x), channel_id=1, replica_groups={{0,1}}, to_apply=%add
  %ag-start = (f32[4]{0}, f32[8]{0}) all-gather-start(%y), channel_id=2, dimensions={0}
  %ag-done = f32[8]{0} all-gather-done(%ag-start)
}

%wrapped_reduce-scatter (a: bf16[16,2]) -> bf16[8,2] {
  ROOT %rs = bf16[8,2]{1,0} reduce-scatter(%a), channel_id=3, dimensions={0}, to_apply=%add
}

ENTRY %main.9 () -> f32[] {
  %w = (s32[], f32[8]{0}) while(%t), condition=%cond.1, body=%body.1, backend_config={"known_trip_count":{"n":"3"}}
  %ar2 = (f32[2,3]{1,0}, s32[]) all-reduce(%u, %v), channel_id=4, to_apply=%add
  %cp = u8[10]{0} collective-permute(%z), channel_id=5, source_target_pairs={{0,1}}
  %a2a = f32[4]{0} all-to-all(%q), channel_id=6, dimensions={0}
  %ar-start = f32[5]{0} all-reduce-start(%r), channel_id=7, to_apply=%add
  ROOT %ar-done = f32[5]{0} all-reduce-done(%ar-start)
}
'''


def test_collectives_parser_on_hlo_text():
  """Sync ops, async pairs (counted once, by their -done), tuples, loop bodies (x trip count)."""
  out = plan_lib.collectives(_HLO)
  assert out['all-reduce'] == {'count': 3 + 1 + 1, 'bytes': 3 * 32 + (24 + 4) + 20}
  assert out['all-gather'] == {'count': 3, 'bytes': 3 * 32}
  assert out['reduce-scatter'] == {'count': 1, 'bytes': 8 * 2 * 2}
  assert out['collective-permute'] == {'count': 1, 'bytes': 10}
  assert out['all-to-all'] == {'count': 1, 'bytes': 16}
  assert plan_lib.shape_bytes('(f32[2,3]{1,0}, s32[], token[])') == 28
