"""Peak dense FLOP/s per device kind and compute dtype (NVIDIA tensor cores, Cloud TPU chips).

`peak_tflops(device_kind, dtype)` matches the longest table key contained in JAX's `device_kind`
string (e.g. 'NVIDIA H100 80GB HBM3' -> 'H100'; 'NVIDIA H100 PCIe' -> 'H100 PCIe') in the table of
the run's compute dtype; None for unknown kinds, CPUs and dtypes a kind has no figure for. Figures
are per JAX device, dense (no 2:4 sparsity), with fp32 accumulation:
- 'bfloat16': bf16 inputs (`PEAK_TFLOPS`).
- 'float16': fp16 inputs; NVIDIA tensor cores run fp16 at the bf16 rate (V100: fp16 only); TPUs
  have no fp16 figure (None).
- 'float32': what JAX's default matmul/conv precision runs float32 on ("float32 dot products may
  be computed with reduced-precision arithmetic internally (bfloat16 on TPU, TF32 on recent GPUs)",
  docs.jax.dev, Matmul precision): the dense TF32 tensor-core peak on NVIDIA Ampere and later, the
  FP32 CUDA-core peak on V100 (no TF32), the bf16 MXU peak on TPU (one bf16 pass).
`memory_bytes(device_kind)` is the per-device HBM, used where the runtime cannot say (ahead-of-time
compiles for a TPU topology on a CPU host); on a live device `device.memory_stats()` is preferred.

Sources (vendor data sheets; sparse figures halved where only those are given):
- H100 SXM 989.4, PCIe 756, NVL 835: NVIDIA H100 Tensor Core GPU data sheet (2023), "BF16 Tensor
  Core 1,979 / 1,513 / 1,671 teraFLOPS with sparsity"; TF32 989 / 756 / 835 with sparsity.
- H200 SXM 989, NVL 835: NVIDIA H200 data sheet (2024; the compute of H100 SXM / NVL, 141 GB
  HBM3e).
- GH200 989: NVIDIA GH200 Grace Hopper data sheet (H100-class GPU).
- B200 2,250: NVIDIA DGX B200 / HGX B200 specifications (4.5 PFLOPS FP16/BF16, 2.2 PFLOPS TF32,
  with sparsity).
- GB200 2,500: NVIDIA GB200 NVL72 specifications (180 PFLOPS dense FP16/BF16 over 72 GPUs; TF32
  90 PFLOPS dense).
- A100 312: NVIDIA A100 data sheet (SXM and PCIe alike; TF32 156). A10 125 (TF32 62.5), L4 121
  (242 with sparsity; TF32 120 with sparsity), L40 181 (362 with sparsity; TF32 181 with sparsity),
  L40S 362 (733 with sparsity; TF32 366 with sparsity): the respective NVIDIA data sheets.
- V100 125: FP16 tensor cores (V100 has no bf16: a bf16 program runs far below this); FP32 15.7
  (SXM2 data sheet).
- RTX 4090 165: Ada whitepaper, FP16/BF16 with FP32 accumulation; TF32 82.6.
- TPU v4 275, v5e 197, v5p 459, v6e (Trillium) 918: Google Cloud TPU system architecture pages
  (bf16 peak per chip; v4 and v5p expose one megacore device per chip).
- TPU v7 (Ironwood, JAX kind 'TPU7x') 2,307 per chip (Google Cloud Ironwood announcement, 2025:
  4,614 FP8 TFLOP/s per chip, bf16 half of that); JAX exposes the chip's two TensorCores as two
  devices, so 1,153.5 per device.
Memory per device: TPU v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e 32 GiB, v7 192 GiB per chip = 96 GiB
per device (same pages).
"""

PEAK_TFLOPS = {
    'H100': 989.4, 'H100 PCIe': 756.0, 'H100 NVL': 835.0,
    'H200': 989.4, 'H200 NVL': 835.0, 'GH200': 989.4,
    'B200': 2250.0, 'GB200': 2500.0,
    'A100': 312.0, 'A10': 125.0, 'L4': 121.0, 'L40': 181.0, 'L40S': 362.0,
    'V100': 125.0, 'RTX 4090': 165.0,
    'TPU v4': 275.0, 'TPU v5 lite': 197.0, 'TPU v5e': 197.0, 'TPU v5': 459.0, 'TPU v5p': 459.0,
    'TPU v6 lite': 918.0, 'TPU v6e': 918.0, 'TPU7x': 1153.5,
}

_TPU_KINDS = ('TPU v4', 'TPU v5 lite', 'TPU v5e', 'TPU v5', 'TPU v5p', 'TPU v6 lite', 'TPU v6e',
              'TPU7x')
FLOAT16_TFLOPS = {k: v for k, v in PEAK_TFLOPS.items() if k not in _TPU_KINDS}
FLOAT32_TFLOPS = {
    'H100': 494.7, 'H100 PCIe': 378.0, 'H100 NVL': 417.5,
    'H200': 494.7, 'H200 NVL': 417.5, 'GH200': 494.7,
    'B200': 1100.0, 'GB200': 1250.0,
    'A100': 156.0, 'A10': 62.5, 'L4': 60.0, 'L40': 90.5, 'L40S': 183.0,
    'V100': 15.7, 'RTX 4090': 82.6,
    **{k: PEAK_TFLOPS[k] for k in _TPU_KINDS},
}
PEAK_TFLOPS_BY_DTYPE = {'bfloat16': PEAK_TFLOPS, 'float16': FLOAT16_TFLOPS,
                        'float32': FLOAT32_TFLOPS}

_GIB = 1024 ** 3
TPU_MEMORY_BYTES = {
    'TPU v4': 32 * _GIB, 'TPU v5 lite': 16 * _GIB, 'TPU v5e': 16 * _GIB, 'TPU v5': 95 * _GIB,
    'TPU v5p': 95 * _GIB, 'TPU v6 lite': 32 * _GIB, 'TPU v6e': 32 * _GIB, 'TPU7x': 96 * _GIB,
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
