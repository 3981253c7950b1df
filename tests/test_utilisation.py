"""Profiler traces (training steps and evaluation extraction) and the utilisation fields of
metrics.jsonl, checked against what the tests measure themselves: FLOPs counted by hand for a
small program (one device and sharded over 8), step times, input waits and checkpoint times timed
by the test's own clock; fraction of peak per compute dtype; the peak table."""

import glob
import gzip
import json
import os
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dolg_jax import profiling
from dolg_jax.retrieval import extract as ex
from dolg_jax.training import metric_logging
from dolg_jax.training import peaks
from dolg_jax.training import utilisation
from tests.helpers import train_testlib as tl
from tests.helpers.eval_config import extract_config


def _trace_events(log_dir: str) -> list[dict]:
  """Complete events of the one trace under log_dir (checks the xprof layout on the way)."""
  xplanes = glob.glob(os.path.join(log_dir, 'plugins', 'profile', '*', '*.xplane.pb'))
  assert len(xplanes) == 1 and os.path.getsize(xplanes[0]) > 0, xplanes
  (trace,) = glob.glob(os.path.join(os.path.dirname(xplanes[0]), '*.trace.json.gz'))
  with gzip.open(trace) as f:
    return [e for e in json.load(f)['traceEvents'] if e.get('ph') == 'X']


@pytest.fixture(scope='module')
def profiled_run(tmp_path_factory):
  """One 4-step tiny run tracing steps 2-3 (checkpoints every 2 steps)."""
  tl.ensure_fixture()
  workdir = str(tmp_path_factory.mktemp('profiled'))
  proc = tl.run_main(workdir, tl.STEPS, '--config.train.profile_steps=(1,2)')
  assert proc.returncode == 0, tl.explain(proc)
  return workdir


def test_training_trace_names_the_parts_of_a_step(profiled_run):
  events = _trace_events(os.path.join(profiled_run, utilisation.PROFILE_DIR))
  steps = sorted(int(e['args']['step_num']) for e in events if e['name'] == 'train')
  assert steps == [2, 3]  # profile_steps=(1, 2): the steps after state.step 1 and 2.
  names = {e['name'] for e in events}
  assert {'input_wait', 'checkpoint'} <= names, sorted(n for n in names if '$' not in n)
  assert any('train_step' in n for n in names)  # The jitted step's dispatch/execution.


def test_metrics_carry_utilisation(profiled_run):
  """The loop's wiring (the fields' values are checked against independent measurements below)."""
  records = tl.read_metrics(profiled_run)
  assert [r['step'] for r in records] == [1, 2, 3, 4]
  assert 'tflops_per_sec' not in records[0]  # Step 1 compiles: the clocks restart after it.
  for r in records[1:]:
    assert r['images_per_sec_per_device'] == pytest.approx(r['images_per_sec'])  # one device
    assert 0.0 <= r['input_wait_fraction'] <= 1.0 and 0.0 <= r['checkpoint_fraction'] <= 1.0
    assert r['input_wait_s'] > 0.0 and r['tflops_per_sec'] > 0.0
    assert r['tflops_per_sec_per_device'] == pytest.approx(r['tflops_per_sec'])
    assert 'fraction_of_peak' not in r  # CPU: no peak
  # Every step is the same program: the same FLOPs per image on every line, however fast it ran.
  per_image = [r['tflops_per_sec'] / r['images_per_sec'] for r in records[1:]]
  np.testing.assert_allclose(per_image, per_image[0], rtol=1e-6)
  # The checkpoint of step 2 falls in the interval logged at step 3, with the trace's end.
  by_step = {r['step']: r for r in records}
  assert by_step[3]['checkpoint_time_s'] > 0.0 and by_step[2]['checkpoint_time_s'] == 0.0
  assert by_step[3]['profiler_time_s'] > 0.0 and 'profiler_time_s' not in by_step[4]


# A program whose FLOPs are counted by hand: a VALID 3x3 convolution and a dense layer.
_N, _H, _W, _C, _K, _O, _M = 4, 10, 12, 3, 3, 8, 5
_HO, _WO = _H - _K + 1, _W - _K + 1
KNOWN_FLOPS = 2 * _N * _HO * _WO * _O * (_K * _K * _C) + 2 * _N * (_HO * _WO * _O) * _M


def _known_program():
  def f(x, w1, w2):
    y = jax.lax.conv_general_dilated(
      x, w1, (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )
    return y.reshape(y.shape[0], -1) @ w2

  args = (jnp.ones((_N, _H, _W, _C)), jnp.ones((_K, _K, _C, _O)), jnp.ones((_HO * _WO * _O, _M)))
  return jax.jit(f), args


def test_train_step_flops_counts_a_program_of_known_flops():
  fn, args = _known_program()
  fn(*args)
  assert utilisation.train_step_flops(fn, *args) == KNOWN_FLOPS


_SHARDED_FLOPS = textwrap.dedent('''
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from dolg_jax.training import utilisation
  mesh = Mesh(np.array(jax.devices()), ('data',))
  n, k, m = 64, 48, 40
  x = jax.device_put(jnp.ones((n, k)), NamedSharding(mesh, P('data')))
  w = jax.device_put(jnp.ones((k, m)), NamedSharding(mesh, P()))
  fn = jax.jit(lambda x, w: x @ w, out_shardings=NamedSharding(mesh, P('data')))
  fn(x, w)
  print('FLOPS', jax.device_count(), utilisation.train_step_flops(fn, x, w), 2 * n * k * m)
''')


def test_train_step_flops_of_a_sharded_step_are_all_devices_flops():
  """8 devices, each multiplying 1/8 of the rows: the count is the whole batch's 2*n*k*m."""
  env = tl.env(XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
  proc = subprocess.run(
    [sys.executable, '-c', _SHARDED_FLOPS],
    cwd=tl.REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, tl.explain(proc)
  _, devices, flops, expected = next(
    l for l in proc.stdout.splitlines() if l.startswith('FLOPS')
  ).split()
  assert int(devices) == 8 and float(flops) == float(expected)


def test_fields_equal_what_the_test_measures(tmp_path):
  """Four steps of known FLOPs timed by the test's own clock, with input waits and a checkpoint:
  throughput, TFLOP/s and the time fractions equal the test's measurements."""
  batch, steps = 32, 4
  util = utilisation.Utilisation(str(tmp_path), (0, 0), batch, True, 'float32')
  progress = metric_logging.Progress(10, 0, batch)
  util.restart(1, KNOWN_FLOPS)  # after the (compiling) first step, as the loop does
  progress.restart(1)
  waited = saved = 0.0
  t0 = time.perf_counter()
  for step in range(2, 2 + steps):
    t = time.perf_counter()
    with util.region('input_wait'):
      time.sleep(0.02)
    waited += time.perf_counter() - t
    time.sleep(0.03)  # the device step
    if step == 3:
      t = time.perf_counter()
      with util.region('checkpoint'):
        time.sleep(0.04)
      saved += time.perf_counter() - t
  wall = time.perf_counter() - t0
  fields = util.fields(1 + steps, progress.update(1 + steps))
  step_time = wall / steps
  assert fields['images_per_sec_per_device'] == pytest.approx(batch / step_time, rel=0.02)
  assert fields['tflops_per_sec'] == pytest.approx(KNOWN_FLOPS / step_time / 1e12, rel=0.02)
  assert fields['input_wait_s'] == pytest.approx(waited, rel=0.02)
  assert fields['input_wait_fraction'] == pytest.approx(waited / wall, rel=0.03)
  assert fields['checkpoint_time_s'] == pytest.approx(saved, rel=0.02)
  assert fields['checkpoint_fraction'] == pytest.approx(saved / wall, rel=0.03)
  assert 'fraction_of_peak' not in fields  # CPU
  # The next interval starts empty: no step, no fields; then only what happened in it.
  assert util.fields(1 + steps, {}) == {}


class _FakeDevice:
  platform = 'gpu'

  def __init__(self, kind):
    self.device_kind = kind


@pytest.mark.parametrize('kind', ['NVIDIA H100 80GB HBM3', 'NVIDIA A100-SXM4-80GB'])
def test_fraction_of_peak_is_of_the_runs_compute_dtype(tmp_path, monkeypatch, kind):
  """The same step time on the same GPU: a float32 run (TF32 tensor cores) is a larger fraction
  of its (lower) peak than a bf16 run; a dtype without a figure gets no fraction."""
  monkeypatch.setattr(jax, 'devices', lambda *a: [_FakeDevice(kind)])
  out = {}
  for dtype in ('bfloat16', 'float32', 'float16'):
    util = utilisation.Utilisation(str(tmp_path), (0, 0), 8, True, dtype)
    util.restart(0, 1e15)
    out[dtype] = util.fields(1, {'step_time_s': 2.0})
  for dtype, fields in out.items():  # 0.5 PFLOP/s achieved on one device
    assert fields['fraction_of_peak'] * peaks.peak_tflops(kind, dtype) == pytest.approx(500.0)
  f32, bf16 = out['float32']['fraction_of_peak'], out['bfloat16']['fraction_of_peak']
  assert f32 == pytest.approx(2 * bf16)
  assert out['float16']['fraction_of_peak'] == out['bfloat16']['fraction_of_peak']
  monkeypatch.setattr(jax, 'devices', lambda *a: [_FakeDevice('TPU v5 lite')])
  util = utilisation.Utilisation(str(tmp_path), (0, 0), 8, True, 'float16')
  util.restart(0, 1e15)
  assert 'fraction_of_peak' not in util.fields(1, {'step_time_s': 2.0})  # no TPU fp16 figure


def _stand_in(variables, images):
  return images.astype(jnp.float32).mean((1, 2)) @ variables['w']


def test_extraction_trace_covers_its_window(tmp_path):
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 255, (64, 80, 3), dtype=np.uint8) for _ in range(5)]
  window = profiling.Window(str(tmp_path), 1, 2)
  extractor = ex.Extractor(
    _stand_in,
    {'w': jnp.ones((3, 4))},
    extract_config(scales=(1.0,), batch_size=1, num_workers=0),
    profile=window,
  )
  extractor.extract([{'index': i, 'image': im} for i, im in enumerate(images)], len(images))
  assert window.done and not window.active
  batches = sorted(
    int(e['args']['step_num']) for e in _trace_events(str(tmp_path)) if e['name'] == 'extract'
  )
  assert batches == [1, 2]


def test_profile_window_rejects_negative_values(tmp_path):
  with pytest.raises(ValueError, match='must be >= 0'):
    profiling.Window(str(tmp_path), -1, 2)


def test_peak_table():
  """The longest matching kind, per compute dtype (figures and sources: training/peaks.py)."""
  for dtype in ('bfloat16', 'float16'):
    assert peaks.peak_tflops('NVIDIA H100 80GB HBM3', dtype) == 989.4
    assert peaks.peak_tflops('NVIDIA H100 PCIe', dtype) == 756.0
    assert peaks.peak_tflops('NVIDIA H200 NVL', dtype) == 835.0
  assert peaks.peak_tflops('NVIDIA H200', 'bfloat16') == 989.4
  assert peaks.peak_tflops('NVIDIA GB200', 'bfloat16') == 2500.0
  assert peaks.peak_tflops('NVIDIA B200', 'bfloat16') == 2250.0
  assert peaks.peak_tflops('NVIDIA L40S', 'bfloat16') == 362.0
  assert peaks.peak_tflops('NVIDIA L4', 'bfloat16') == 121.0
  assert peaks.peak_tflops('NVIDIA A100-SXM4-80GB', 'bfloat16') == 312.0
  assert peaks.peak_tflops('TPU v5 lite', 'bfloat16') == 197.0
  assert peaks.peak_tflops('TPU v5', 'bfloat16') == 459.0
  assert peaks.peak_tflops('TPU v6 lite', 'bfloat16') == 918.0
  assert peaks.peak_tflops('TPU v4', 'bfloat16') == 275.0
  assert peaks.peak_tflops('TPU7x', 'bfloat16') == 1153.5
  # float32 at JAX's default precision: TF32 on NVIDIA (FP32 on V100), one bf16 pass on TPU.
  assert peaks.peak_tflops('NVIDIA H100 80GB HBM3', 'float32') == 494.7
  assert peaks.peak_tflops('NVIDIA H100 PCIe', 'float32') == 378.0
  assert peaks.peak_tflops('NVIDIA A100-SXM4-80GB', 'float32') == 156.0
  assert peaks.peak_tflops('Tesla V100-SXM2-16GB', 'float32') == 15.7
  assert peaks.peak_tflops('TPU v5 lite', 'float32') == 197.0
  for kind in peaks.PEAK_TFLOPS:  # Nowhere is float32 faster than bf16.
    f32 = peaks.peak_tflops(kind, 'float32')
    assert f32 is None or f32 <= peaks.peak_tflops(kind, 'bfloat16'), kind
  assert peaks.peak_tflops('TPU v5 lite', 'float16') is None
  assert peaks.peak_tflops('NVIDIA H100 80GB HBM3', 'float64') is None
  assert peaks.peak_tflops('cpu', 'bfloat16') is None
  assert peaks.memory_bytes('TPU v5 lite') == 16 * 1024**3 and peaks.memory_bytes('cpu') is None
