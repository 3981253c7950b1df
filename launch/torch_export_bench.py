"""PyTorch side of dolg_jax/tools/bench_export.py: the official DOLG model's CPU inference latency.

  python launch/torch_export_bench.py --images=IMAGES.npy --output=OUT.json
      [--save_checkpoint=official.pth] [--depth=50] [--width=64] [--with_aspp=1] [--runs=5]
      [--warmup=1] [--threads=0]

Builds the official model (tests/helpers/torch_reference.py, the PyTorch reference our parity tests
compare against) with random weights and perturbed BN statistics (`randomize_`), optionally saves
its state dict (a .pth that `dolg_jax.export --checkpoint` reads, so the exported model has the
same weights), and times `model(x)` in eval mode under torch.no_grad(), float32, on the CPU, for
each image of IMAGES.npy ((N, H, W, 3) RGB float32 in [0, 255], run one at a time, after the
official preprocessing). Writes OUT.json {torch_version, threads, ms_per_image: [...], ...} and
OUT.npy, the L2-normalised descriptors (N, 512).

Outside the dolg_jax package on purpose (it imports the repository's test-only reference; the
package must not import tests/), as launch/torch_reference_bench.py.
"""

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tests.helpers import torch_reference  # noqa: E402


def main():
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument('--images', required=True)
  p.add_argument('--output', required=True)
  p.add_argument('--save_checkpoint', default='')
  p.add_argument('--depth', type=int, default=50)
  p.add_argument('--width', type=int, default=64)
  p.add_argument('--with_aspp', type=int, default=1)
  p.add_argument('--runs', type=int, default=5)
  p.add_argument('--warmup', type=int, default=1)
  p.add_argument('--threads', type=int, default=0, help='torch.set_num_threads (0: default)')
  args = p.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  model = torch_reference.DOLGReference(
    depth=args.depth, width=args.width, with_aspp=bool(args.with_aspp)
  )
  torch_reference.randomize_(model, seed=0)
  model.eval()
  if args.save_checkpoint:
    torch.save(model.state_dict(), args.save_checkpoint)
  images = np.load(args.images)
  times, descs = [], []
  with torch.no_grad():
    for img in images:
      x = torch_reference.preprocess_rgb(img[None])
      for _ in range(args.warmup):
        model(x)
      for _ in range(args.runs):
        t = time.perf_counter()
        d = model(x)
        times.append(1000 * (time.perf_counter() - t))
      d = d.numpy().astype(np.float32)
      descs.append(d / np.linalg.norm(d, axis=1, keepdims=True))
  np.save(os.path.splitext(args.output)[0] + '.npy', np.concatenate(descs))
  out = {
    'torch_version': torch.__version__,
    'threads': torch.get_num_threads(),
    'depth': args.depth,
    'width': args.width,
    'with_aspp': bool(args.with_aspp),
    'image_shape': list(images.shape[1:]),
    'ms_per_image': times,
  }
  with open(args.output, 'w') as f:
    json.dump(out, f, indent=1)
  print(
    f'torch {torch.__version__} ({torch.get_num_threads()} threads): median '
    f'{float(np.median(times)):.1f} ms per image'
  )


if __name__ == '__main__':
  main()
