"""A `model` mesh axis splits the batch too: the same update and the same total FLOPs as without it.

The tiny DOLG on 8 CPU devices, global batch 16, one train step with mesh (8, 1) and (4, 2): the
parameters after the step agree, and XLA's FLOPs per step summed over devices agree within 10%
(before the batch was split over `model` too, (4, 2) cost 1.94x: every model-axis replica ran the
backbone on the same images).
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

from tests.helpers.paths import REPO

_SCRIPT = textwrap.dedent('''
    import json
    import jax, numpy as np
    from configs import tiny
    from dolg_jax import sharding as shd
    from dolg_jax.training import state as state_lib
    from dolg_jax.training import step as step_lib

    rng = np.random.default_rng(0)
    batch = {'image': rng.integers(0, 256, (16, 64, 64, 3), dtype=np.uint8),
             'label': rng.integers(0, 8, (16,), dtype=np.int32)}
    out = {}
    for model_axis in (1, 2):
      c = tiny.get_config()
      c.train.global_batch_size = 16
      c.mesh.model = model_axis
      mesh = shd.make_mesh(c.mesh)
      setup = state_lib.make_setup(c, mesh, 8)
      state, sh = state_lib.create_train_state(setup, jax.random.key(0))
      step = step_lib.make_train_step(setup, sh)
      gb = shd.global_batch(mesh, batch)
      lr = np.float32(0.5)
      compiled = step.lower(state, gb, lr).compile()   # one compilation: measured, then run
      flops = step_lib.train_flops_per_step(compiled) * len(jax.devices())
      new, metrics = compiled(state, gb, lr)
      params = jax.device_get(new.params)
      out[model_axis] = {'flops': flops, 'loss': float(metrics['loss']),
                         'params': [np.asarray(p, np.float64).ravel().tolist()
                                    for p in jax.tree.leaves(params)]}
    print('RESULT ' + json.dumps(out))
''')


def test_model_axis_gives_the_same_update_at_the_same_total_flops():
  env = dict(
    os.environ,
    XLA_FLAGS='--xla_force_host_platform_device_count=8',
    JAX_PLATFORMS='cpu',
    PYTHONPATH=os.pathsep.join([REPO, os.environ.get('PYTHONPATH', '')]),
  )
  proc = subprocess.run(
    [sys.executable, '-c', _SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith('RESULT '))
  out = json.loads(line[len('RESULT ') :])
  one, two = out['1'], out['2']
  print(f"total FLOPs per step: mesh.model=1 {one['flops']:.4g}, mesh.model=2 {two['flops']:.4g}")
  assert abs(two['flops'] / one['flops'] - 1) < 0.10
  assert two['loss'] == np.float64(one['loss']) or abs(two['loss'] - one['loss']) < 1e-5 * abs(
    one['loss']
  )
  for a, b in zip(one['params'], two['params']):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
