"""Peak dense FLOP/s per device kind and compute dtype (NVIDIA tensor cores, Cloud TPU chips).

`peak_tflops(device_kind, dtype)` matches the longest table key contained in JAX's `device_kind`
string (e.g. 'NVIDIA H100 80GB HBM3' -> 'H100') in the table of the run's compute dtype
('bfloat16', 'float16', 'float32'); None for unknown kinds, CPUs and dtypes a kind has no figure
for. Figures are per JAX device, dense, with fp32 accumulation. `memory_bytes(device_kind)` is the
per-device HBM, for where the runtime cannot say (compile-only TPU devices). What each dtype's
figure means and the source of every number: docs/design_notes.md.
"""

PEAK_TFLOPS = {
  'H100': 989.4,
  'H100 PCIe': 756.0,
  'H100 NVL': 835.0,
  'H200': 989.4,
  'H200 NVL': 835.0,
  'GH200': 989.4,
  'B200': 2250.0,
  'GB200': 2500.0,
  'A100': 312.0,
  'A10': 125.0,
  'L4': 121.0,
  'L40': 181.0,
  'L40S': 362.0,
  'V100': 125.0,
  'RTX 4090': 165.0,
  'TPU v4': 275.0,
  'TPU v5 lite': 197.0,
  'TPU v5e': 197.0,
  'TPU v5': 459.0,
  'TPU v5p': 459.0,
  'TPU v6 lite': 918.0,
  'TPU v6e': 918.0,
  'TPU7x': 1153.5,
}

_TPU_KINDS = (
  'TPU v4',
  'TPU v5 lite',
  'TPU v5e',
  'TPU v5',
  'TPU v5p',
  'TPU v6 lite',
  'TPU v6e',
  'TPU7x',
)
FLOAT16_TFLOPS = {k: v for k, v in PEAK_TFLOPS.items() if k not in _TPU_KINDS}
FLOAT32_TFLOPS = {
  'H100': 494.7,
  'H100 PCIe': 378.0,
  'H100 NVL': 417.5,
  'H200': 494.7,
  'H200 NVL': 417.5,
  'GH200': 494.7,
  'B200': 1100.0,
  'GB200': 1250.0,
  'A100': 156.0,
  'A10': 62.5,
  'L4': 60.0,
  'L40': 90.5,
  'L40S': 183.0,
  'V100': 15.7,
  'RTX 4090': 82.6,
  **{k: PEAK_TFLOPS[k] for k in _TPU_KINDS},
}
PEAK_TFLOPS_BY_DTYPE = {
  'bfloat16': PEAK_TFLOPS,
  'float16': FLOAT16_TFLOPS,
  'float32': FLOAT32_TFLOPS,
}

_GIB = 1024**3
TPU_MEMORY_BYTES = {
  'TPU v4': 32 * _GIB,
  'TPU v5 lite': 16 * _GIB,
  'TPU v5e': 16 * _GIB,
  'TPU v5': 95 * _GIB,
  'TPU v5p': 95 * _GIB,
  'TPU v6 lite': 32 * _GIB,
  'TPU v6e': 32 * _GIB,
  'TPU7x': 96 * _GIB,
}


def _lookup(table: dict, device_kind: str):
  matches = [k for k in table if k.lower() in device_kind.lower()]
  return table[max(matches, key=len)] if matches else None


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  """Peak dense TFLOP/s of one device of this kind computing in `dtype` ('bfloat16', 'float16',
  'float32'); the longest table key contained in the device kind (e.g. 'NVIDIA H100 80GB HBM3'
  -> H100); None for unknown kinds and dtypes."""
  table = PEAK_TFLOPS_BY_DTYPE.get(str(dtype))
  return _lookup(table, device_kind) if table else None


def memory_bytes(device_kind: str) -> int | None:
  """Per-device HBM of a TPU kind from the table (None for other kinds)."""
  return _lookup(TPU_MEMORY_BYTES, device_kind)
