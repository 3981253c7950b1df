"""dolg_jax.tools.bench_train prints throughput, step time and XLA-cost-analysis TFLOP/s."""

import re
import subprocess
import sys

from tests.helpers import train_testlib as tl


def test_bench_tiny_cpu():
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'dolg_jax.tools.bench_train',
      '--config=configs/tiny.py',
      '--batch=8',
      '--steps=2',
      '--warmup=1',
    ],
    cwd=tl.REPO,
    env=tl.env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, tl.explain(proc)
  m = re.search(r'train: ([\d.]+) images/s, step ([\d.]+) ms', proc.stdout)
  assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0, proc.stdout
  m = re.search(r'([\d.]+) GFLOP/step -> ([\d.]+) TFLOP/s achieved', proc.stdout)
  assert m and float(m.group(1)) > 0, proc.stdout
