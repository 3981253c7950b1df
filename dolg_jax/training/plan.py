"""Ahead-of-time plan of the train step: FLOPs and per-device memory, compiled without running.

`plan(config, devices)` lowers and compiles the real jitted train step over the configured mesh
from `jax.ShapeDtypeStruct`s (no parameter initialised, no data read) and returns XLA's analyses:
flops_per_step(_unoptimised), flops_per_device_step, peak / argument / temp / batch bytes per
device, device_kind, device_memory_bytes, fits (peak <= device memory; None when unknown) and
collectives per kind. `max_batch(...)` finds the largest per-device batch that fits;
`topology_devices(name)` gives the compile-only devices of a Cloud TPU topology. The definition of
every field: docs/design_notes.md.
"""

from __future__ import annotations

import importlib.util
import math
import re
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import topologies

from dolg_jax import sharding as shd
from dolg_jax.training import peaks
from dolg_jax.training import state as state_lib
from dolg_jax.training import step as step_lib


class PlanError(ValueError):
  """A plan that cannot be made (one line naming the cause and what to do)."""


def topology_devices(name: str) -> list:
  """Compile-only devices of the Cloud TPU topology `name` (libtpu's names, e.g. 'v5e:2x4',
  'v4:2x2x2', 'v5p:2x2x2', 'v6e:4x4'); needs libtpu."""
  if importlib.util.find_spec('libtpu') is None:
    raise PlanError(
      f'--topology={name} needs libtpu to compile for TPUs on this host: pip install '
      '"jax[tpu]==0.10.2" (see requirements.txt), or drop --topology to plan for '
      'the local devices.'
    )
  try:
    return list(topologies.get_topology_desc(topology_name=name, platform='tpu').devices)
  except Exception as e:  # libtpu's errors name the bad topology.
    raise PlanError(
      f'--topology={name}: libtpu cannot describe it ({e}); use a name such as '
      "'v5e:2x4', 'v4:2x2x2', 'v5p:2x2x2' or 'v6e:4x4'."
    ) from e


def device_memory_bytes(device) -> int | None:
  """The allocator's limit on a live accelerator; the kind's HBM for compile-only TPU devices."""
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001  # Compile-only devices cannot be queried.
    stats = None
  if stats and stats.get('bytes_limit'):
    return int(stats['bytes_limit'])
  if device.platform == 'tpu':
    return peaks.memory_bytes(device.device_kind)
  return None


COLLECTIVE_KINDS = (
  'all-reduce',
  'all-gather',
  'reduce-scatter',
  'collective-permute',
  'all-to-all',
)
_DTYPE_BYTES = {
  'pred': 1,
  's4': 0.5,
  'u4': 0.5,
  's8': 1,
  'u8': 1,
  's16': 2,
  'u16': 2,
  'f16': 2,
  'bf16': 2,
  's32': 4,
  'u32': 4,
  'f32': 4,
  's64': 8,
  'u64': 8,
  'f64': 8,
  'c64': 8,
  'c128': 16,
}
# `%name = SHAPE kind(` (synchronous) or `%name = SHAPE kind-done(` (the result of an async pair;
# its -start is skipped so that each collective counts once). Async wrappers (`async-start` with
# calls=%wrapped_reduce-scatter) print the synchronous op inside the wrapped computation.
_COLLECTIVE_RE = re.compile(
  r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.*?)\s+'
  r'(?P<kind>' + '|'.join(COLLECTIVE_KINDS) + r')(?:-done)?\('
)
_ARRAY_RE = re.compile(r'\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]')


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string: 'f32[4,8]{1,0}', 'bf16[]' or a tuple '(f32[4]{0}, s32[])'."""
  total = 0.0
  for dtype, dims in _ARRAY_RE.findall(shape):
    size = _DTYPE_BYTES.get(dtype, 1 if dtype.startswith('f8') else None)
    if size is None:
      continue  # token[] and other non-array types carry no data
    total += size * math.prod(int(d) for d in dims.split(',') if d)
  return int(total)


_COMPUTATION_RE = re.compile(r'^(?:ENTRY\s+)?%(?P<name>[\w.\-]+)\s.*\{\s*$')
_WHILE_RE = re.compile(r'\swhile\(.*\bbody=%(?P<body>[\w.\-]+)')
_TRIP_RE = re.compile(r'"known_trip_count":\{"n":"(?P<n>\d+)"')


def collective_ops(hlo_text: str) -> list[dict]:
  """Every collective of a compiled HLO module's text: [{'kind', 'shape', 'bytes', 'times'}].

  `bytes` are those of the op's result on one device (all-reduce: the reduced buffer;
  all-gather: the gathered one; reduce-scatter: this device's part; collective-permute,
  all-to-all: the buffer); `times` is how often one step runs it: the product of the known trip
  counts of the while loops whose bodies hold it (1 outside loops; a loop without a known trip
  count counts once).
  """
  ops, comp = [], None
  parent: dict[str, tuple[str, int]] = {}  # while body -> (computation holding the while, n)
  for line in hlo_text.splitlines():
    c = _COMPUTATION_RE.match(line)
    if c and '=' not in line.split('(')[0]:
      comp = c.group('name')
      continue
    w = _WHILE_RE.search(line)
    if w:
      t = _TRIP_RE.search(line)
      parent[w.group('body')] = (comp, int(t.group('n')) if t else 1)
    m = _COLLECTIVE_RE.match(line)
    if m:
      ops.append(
        {
          'kind': m.group('kind'),
          'shape': m.group('shape'),
          'bytes': shape_bytes(m.group('shape')),
          'computation': comp,
        }
      )

  def times(name, depth=0):
    if name not in parent or depth > 64:
      return 1
    holder, n = parent[name]
    return n * times(holder, depth + 1)

  for op in ops:
    op['times'] = times(op.pop('computation'))
  return ops


def collectives(hlo_text: str) -> dict:
  """{kind: {'count': n, 'bytes': b}} per step and device for every kind in COLLECTIVE_KINDS
  (zeros when absent): each op of `collective_ops` counted `times` times."""
  out = {k: {'count': 0, 'bytes': 0} for k in COLLECTIVE_KINDS}
  for op in collective_ops(hlo_text):
    out[op['kind']]['count'] += op['times']
    out[op['kind']]['bytes'] += op['bytes'] * op['times']
  return out


def _shard_bytes(tree: Any) -> int:
  """Bytes of one device's shard of a tree of sharded ShapeDtypeStructs (the largest shard)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def _with_batch(config: ml_collections.ConfigDict, global_batch: int | None):
  config = config.copy_and_resolve_references()
  if global_batch is not None:
    config.train.global_batch_size = int(global_batch)
  return config


def plan(
  config: ml_collections.ConfigDict,
  devices: Sequence | None = None,
  *,
  global_batch: int | None = None,
  memory_bytes: int | None = None,
) -> dict:
  """Compiles the train step for `config` on `devices` (default: all local) and returns the plan.

  `global_batch` replaces config.train.global_batch_size; `memory_bytes` replaces the device
  memory (to plan for a device this host does not have).
  """
  config = _with_batch(config, global_batch)
  devices = list(jax.devices() if devices is None else devices)
  mesh = shd.make_mesh(config.mesh, devices)
  setup = state_lib.make_setup(config, mesh)
  abstract_state, state_sh = state_lib.abstract_train_state(setup)
  train_step = step_lib.make_train_step(setup, state_sh)
  b, size = int(config.train.global_batch_size), int(config.data.image_size)
  batch_sh = shd.batch_sharding(mesh)
  batch = {
    'image': jax.ShapeDtypeStruct((b, size, size, 3), jnp.uint8, sharding=batch_sh),
    'label': jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_sh),
  }
  lr = jax.ShapeDtypeStruct((), jnp.float32, sharding=shd.replicated(mesh))

  t0 = time.perf_counter()
  lowered = train_step.lower(abstract_state, batch, lr)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0

  n_dev = len(devices)
  flops_dev = step_lib.train_flops_per_step(compiled)
  mem = compiled.memory_analysis()
  args, outs = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
  temp, alias = int(mem.temp_size_in_bytes), int(mem.alias_size_in_bytes)
  # XLA's own peak where the backend reports one (CPU's counts the arguments only), and never
  # below arguments + outputs + temporaries with the donated buffers counted once.
  reported_peak = int(getattr(mem, 'peak_memory_in_bytes', 0) or 0)
  peak = max(reported_peak, args + outs - alias + temp)
  kind = devices[0].device_kind
  limit = int(memory_bytes) if memory_bytes else device_memory_bytes(devices[0])
  params_bytes = _shard_bytes(abstract_state.params)
  opt_bytes = _shard_bytes(abstract_state.opt_state)
  coll = collectives(compiled.as_text())
  out = {
    'device_kind': kind,
    'platform': devices[0].platform,
    'devices': n_dev,
    'mesh': {k: int(v) for k, v in mesh.shape.items()},
    'global_batch': b,
    'batch_per_device': b // shd.batch_devices(mesh),
    'grad_accum_steps': int(config.train.grad_accum_steps),
    'image_size': size,
    'compute_dtype': config.compute_dtype,
    'num_classes': setup.num_classes,
    'num_params': int(sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state.params))),
    'flops_per_step': flops_dev * n_dev if flops_dev else None,
    'flops_per_device_step': flops_dev,
    'flops_per_step_unoptimised': step_lib.train_flops_per_step(lowered),
    'peak_memory_bytes_per_device': peak,
    'argument_bytes_per_device': _shard_bytes(abstract_state),
    'params_bytes_per_device': params_bytes,
    'optimizer_bytes_per_device': opt_bytes,
    'batch_bytes_per_device': _shard_bytes(batch),
    'compiled_argument_bytes_per_device': args,
    'output_bytes_per_device': outs,
    'alias_bytes_per_device': alias,
    'temp_bytes_per_device': temp,
    'xla_peak_memory_bytes_per_device': reported_peak,
    'device_memory_bytes': limit,
    'fits': (peak <= limit) if limit else None,
    'collectives': coll,
    'collective_bytes_per_device_step': sum(v['bytes'] for v in coll.values()),
    'bn_mode': str(config.train.bn_mode),
    'bn_group_size': int(config.train.bn_group_size),
    'compile_s': compile_s,
  }
  peak_tflops = (
    peaks.peak_tflops(kind, config.compute_dtype) if devices[0].platform != 'cpu' else None
  )
  if peak_tflops and flops_dev:
    out['peak_tflops_per_device'] = peak_tflops
    out['step_time_at_peak_s'] = flops_dev / (peak_tflops * 1e12)
    out['images_per_sec_per_device_at_peak'] = out['batch_per_device'] / out['step_time_at_peak_s']
  return out


def _is_oom(e: Exception) -> bool:
  text = str(e).lower()
  return 'resource_exhausted' in text or 'out of memory' in text


def max_batch(
  config: ml_collections.ConfigDict,
  devices: Sequence | None = None,
  *,
  memory_bytes: int | None = None,
  limit: int = 4096,
) -> dict:
  """The largest per-device batch (a multiple of grad_accum_steps, <= `limit`) whose train step
  fits in device memory: doubling from the configured batch, then bisection.

  Returns {'max_batch_per_device': int | None, 'max_batch_probes': [{batch, peak, fits}, ...]}
  and, when the device memory is unknown, 'max_batch_note' saying why there is no answer.
  """
  devices = list(jax.devices() if devices is None else devices)
  limit_bytes = int(memory_bytes) if memory_bytes else device_memory_bytes(devices[0])
  if not limit_bytes:
    return {
      'max_batch_per_device': None,
      'max_batch_probes': [],
      'max_batch_note': (
        f'device memory of {devices[0].device_kind!r} '
        f'({devices[0].platform}) is unknown: run on the accelerator, use '
        '--topology for a TPU, or pass --device_memory_bytes.'
      ),
    }
  k = int(config.train.grad_accum_steps)
  n_data = shd.batch_devices(shd.make_mesh(config.mesh, devices))
  probes: list[dict] = []
  fits_cache: dict[int, bool] = {}

  def fits(units: int) -> bool:
    if units not in fits_cache:
      per_device = units * k
      try:
        p = plan(config, devices, global_batch=per_device * n_data, memory_bytes=limit_bytes)
        fits_cache[units] = bool(p['fits'])
        probes.append(
          {
            'batch_per_device': per_device,
            'fits': fits_cache[units],
            'peak_memory_bytes_per_device': p['peak_memory_bytes_per_device'],
          }
        )
      except Exception as e:
        if not _is_oom(e):
          raise
        fits_cache[units] = False
        probes.append(
          {'batch_per_device': per_device, 'fits': False, 'error': str(e).splitlines()[0][:200]}
        )
    return fits_cache[units]

  max_units = max(limit // k, 1)
  start = max(int(config.train.global_batch_size) // n_data // k, 1)
  lo, hi = 0, None  # lo fits (0: nothing known to fit), hi does not.
  u = min(start, max_units)
  while hi is None:
    if fits(u):
      lo = u
      if u >= max_units:
        break
      u = min(2 * u, max_units)
    else:
      hi = u
  if hi is not None:
    if lo == 0 and hi > 1:  # The configured batch does not fit: search below it.
      lo_try = hi // 2
      while lo_try >= 1 and not fits(lo_try):
        hi, lo_try = lo_try, lo_try // 2
      lo = max(lo_try, 0)
    while hi - lo > 1:
      mid = (lo + hi) // 2
      if fits(mid):
        lo = mid
      else:
        hi = mid
  out = {
    'max_batch_per_device': lo * k,
    'max_batch_probes': probes,
    'max_batch_memory_bytes': limit_bytes,
  }
  if lo >= max_units:
    out['max_batch_note'] = f'every batch up to the search limit {limit} fits'
  return out
