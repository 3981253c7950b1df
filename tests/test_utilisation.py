"""Profiler traces (training steps and evaluation extraction) and the utilisation fields of
metrics.jsonl; the peak table."""

import glob
import gzip
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from dolg_jax import profiling
from dolg_jax.retrieval import extract as ex
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
  assert steps == [2, 3]   # profile_steps=(1, 2): the steps after state.step 1 and 2.
  names = {e['name'] for e in events}
  assert {'input_wait', 'checkpoint'} <= names, sorted(n for n in names if '$' not in n)
  assert any('train_step' in n for n in names)  # The jitted step's dispatch/execution.


def test_metrics_carry_utilisation(profiled_run):
  records = tl.read_metrics(profiled_run)
  assert [r['step'] for r in records] == [1, 2, 3, 4]
  assert 'tflops_per_sec' not in records[0]   # Step 1 compiles: the clocks restart after it.
  flops = []
  for r in records[1:]:
    assert r['images_per_sec_per_device'] == pytest.approx(r['images_per_sec'])  # one device
    assert 0.0 <= r['input_wait_fraction'] <= 1.0 and 0.0 <= r['checkpoint_fraction'] <= 1.0
    assert r['input_wait_s'] > 0.0
    assert r['tflops_per_sec_per_device'] == pytest.approx(r['tflops_per_sec'])
    assert 'fraction_of_peak' not in r           # CPU: no peak
    flops.append(r['tflops_per_sec'] * 1e12 * r['step_time_s'])
  # The compiled step's FLOPs every time (dolg_jax.plan gives 142,933,824 for this config).
  np.testing.assert_allclose(flops, 142_933_824, rtol=1e-6)
  # The checkpoint of step 2 falls in the interval logged at step 3, with the trace's end.
  by_step = {r['step']: r for r in records}
  assert by_step[3]['checkpoint_time_s'] > 0.0 and by_step[2]['checkpoint_time_s'] == 0.0
  assert by_step[3]['profiler_time_s'] > 0.0 and 'profiler_time_s' not in by_step[4]


def _stand_in(variables, images):
  return images.astype(jnp.float32).mean((1, 2)) @ variables['w']


def test_extraction_trace_covers_its_window(tmp_path):
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 255, (64, 80, 3), dtype=np.uint8) for _ in range(5)]
  window = profiling.Window(str(tmp_path), 1, 2)
  extractor = ex.Extractor(_stand_in, {'w': jnp.ones((3, 4))},
                           extract_config(scales=(1.0,), batch_size=1, num_workers=0),
                           profile=window)
  extractor.extract([{'index': i, 'image': im} for i, im in enumerate(images)], len(images))
  assert window.done and not window.active
  batches = sorted(int(e['args']['step_num']) for e in _trace_events(str(tmp_path))
                   if e['name'] == 'extract')
  assert batches == [1, 2]


def test_profile_window_rejects_negative_values(tmp_path):
  with pytest.raises(ValueError, match='must be >= 0'):
    profiling.Window(str(tmp_path), -1, 2)


def test_peak_table():
  assert peaks.peak_tflops('NVIDIA H100 80GB HBM3') == 989.4
  assert peaks.peak_tflops('NVIDIA H100 PCIe') == 756.0
  assert peaks.peak_tflops('NVIDIA H200') == 989.4
  assert peaks.peak_tflops('NVIDIA H200 NVL') == 835.0
  assert peaks.peak_tflops('NVIDIA GB200') == 2500.0
  assert peaks.peak_tflops('NVIDIA B200') == 2250.0
  assert peaks.peak_tflops('NVIDIA L40S') == 362.0 and peaks.peak_tflops('NVIDIA L4') == 121.0
  assert peaks.peak_tflops('NVIDIA A100-SXM4-80GB') == 312.0
  assert peaks.peak_tflops('TPU v5 lite') == 197.0 and peaks.peak_tflops('TPU v5') == 459.0
  assert peaks.peak_tflops('TPU v6 lite') == 918.0 and peaks.peak_tflops('TPU v4') == 275.0
  assert peaks.peak_tflops('TPU7x') == 1153.5
  assert peaks.peak_tflops('cpu') is None
  assert peaks.memory_bytes('TPU v5 lite') == 16 * 1024 ** 3 and peaks.memory_bytes('cpu') is None
