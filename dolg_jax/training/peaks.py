"""Peak dense bf16 FLOP/s per device kind (NVIDIA tensor cores, Cloud TPU chips), for utilisation.

`peak_tflops(device_kind)` matches the longest table key contained in JAX's `device_kind` string
(e.g. 'NVIDIA H100 80GB HBM3' -> H100); None for unknown kinds (and CPUs).
"""

PEAK_TFLOPS = {
    'H100': 989.0, 'H200': 989.0, 'GH200': 989.0, 'B200': 2250.0, 'A100': 312.0, 'A10': 125.0,
    'L4': 121.0, 'L40': 181.0, 'V100': 125.0, 'RTX 4090': 165.0,
    'TPU v4': 275.0, 'TPU v5 lite': 197.0, 'TPU v5e': 197.0, 'TPU v5p': 459.0, 'TPU v6 lite': 918.0,
}


def peak_tflops(device_kind: str) -> float | None:
  """Longest table key contained in the device kind (e.g. 'NVIDIA H100 80GB HBM3' -> H100)."""
  matches = [k for k in PEAK_TFLOPS if k.lower() in device_kind.lower()]
  return PEAK_TFLOPS[max(matches, key=len)] if matches else None
