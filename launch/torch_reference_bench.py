"""PyTorch side of launch/accelerator_check.sh: the official DOLG model's training step speed.

  python launch/torch_reference_bench.py --output=OUT/torch_reference.json [--smoke]
      [--depths=50,101] [--batches=32,64] [--image_size=512] [--num_classes=81313] [--budget_s=120]

Times forward + backward + SGD step of the official model (tests/helpers/torch_reference.py, the
PyTorch reference our parity tests compare against; multi-atrous on, as configs/r50.py) with a
cosine-margin softmax over `--num_classes` classes (ArcFace m=0.15, s=30, as our train step), AMP
bf16 autocast, channels_last, on CUDA when available (CPU in --smoke). Writes one JSON file.

This script lives outside the dolg_jax package on purpose: it imports the repository's test-only
reference (the package must not import tests/), torch is not a runtime dependency, and running it
in its own process, before the JAX part, keeps PyTorch's and JAX's GPU allocators apart.
"""

import argparse
import json
import math
import os
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tests.helpers import torch_reference  # noqa: E402

SMOKE = {
  'batches': '2',
  'image_size': 64,
  'num_classes': 16,
  'width': 8,
  'stage_depths': '1,1,1,1',
  'steps': 2,
  'warmup': 1,
}


def margin_loss(desc, weight, labels, margin=0.15, scale=30.0):
  """ArcFace: s * cos(theta + m) for the target class, s * cos(theta) for the others; CE."""
  cos = F.linear(F.normalize(desc.float()), F.normalize(weight.float())).clamp(-1 + 1e-7, 1 - 1e-7)
  target = cos.gather(1, labels[:, None])
  with_margin = torch.cos(torch.acos(target) + margin)
  logits = cos.scatter(1, labels[:, None], with_margin) * scale
  return F.cross_entropy(logits, labels)


def bench(depth, batch, args, device):
  stage_depths = tuple(int(s) for s in args.stage_depths.split(',')) if args.stage_depths else ()
  model = torch_reference.DOLGReference(
    depth=depth,
    width=args.width,
    with_aspp=True,
    num_classes=args.num_classes,
    stage_depths=stage_depths,
  ).to(device)
  model = model.to(memory_format=torch.channels_last).train()
  head = model.desc_cls.weight
  opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=1e-4)
  g = torch.Generator().manual_seed(0)
  x = torch.randn(batch, 3, args.image_size, args.image_size, generator=g).to(device)
  x = x.contiguous(memory_format=torch.channels_last)
  y = torch.randint(0, args.num_classes, (batch,), generator=g).to(device)

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
      desc = model(x)
    loss = margin_loss(desc, head, y)
    loss.backward()
    opt.step()
    return loss

  def sync():
    if device.type == 'cuda':
      torch.cuda.synchronize()

  for _ in range(args.warmup):
    loss = step()
  sync()
  times = []
  for _ in range(args.steps):
    t = time.perf_counter()
    loss = step()
    sync()
    times.append(time.perf_counter() - t)
  times.sort()
  step_s = times[len(times) // 2]
  out = {
    'depth': depth,
    'batch': batch,
    'image_size': args.image_size,
    'step_time_s': step_s,
    'images_per_sec': batch / step_s,
    'loss': float(loss.detach()),
  }
  if device.type == 'cuda':
    out['max_memory_allocated_bytes'] = torch.cuda.max_memory_allocated()
  return out


def main():
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument('--output', required=True)
  p.add_argument('--smoke', action='store_true')
  p.add_argument('--depths', default='50,101')
  p.add_argument('--batches', default='32,64')
  p.add_argument('--image_size', type=int, default=512)
  p.add_argument('--num_classes', type=int, default=81313)
  p.add_argument('--width', type=int, default=64)
  p.add_argument('--stage_depths', default='')
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--warmup', type=int, default=3)
  p.add_argument('--budget_s', type=float, default=120.0)
  args = p.parse_args()
  if args.smoke:
    for k, v in SMOKE.items():
      if getattr(args, k) == p.get_default(k):
        setattr(args, k, v)
  deadline = time.monotonic() + args.budget_s
  cuda = torch.cuda.is_available()
  device = torch.device('cuda' if cuda else 'cpu')
  result = {
    'torch_version': torch.__version__,
    'device': torch.cuda.get_device_name(0) if cuda else 'cpu',
    'amp_dtype': 'bfloat16',
    'channels_last': True,
    'num_classes': args.num_classes,
    'smoke': args.smoke,
    'train': [],
  }
  if not cuda and not args.smoke:
    result['error'] = (
      'torch has no CUDA device here (torch.cuda.is_available() is False): '
      'install a CUDA build of torch to compare on the GPU'
    )
  else:
    torch.backends.cudnn.benchmark = True
    for depth in (int(d) for d in args.depths.split(',')):
      for batch in (int(b) for b in args.batches.split(',')):
        entry = {'depth': depth, 'batch': batch}
        if time.monotonic() > deadline:
          entry['skipped'] = 'time budget spent'
        else:
          try:
            entry = bench(depth, batch, args, device)
          except Exception as e:  # noqa: BLE001  # Recorded; the others go on.
            entry.update(
              {
                'error': f'{type(e).__name__}: {e}'.splitlines()[0][:500],
                'traceback': traceback.format_exc(limit=4)[-2000:],
              }
            )
          if cuda:
            torch.cuda.empty_cache()
        result['train'].append(entry)
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  with open(args.output, 'w') as f:
    json.dump(result, f, indent=1)
  for r in result['train']:
    print(
      f"torch R{r['depth']} batch {r['batch']}: {r.get('images_per_sec', math.nan):.1f} "
      f"images/s {r.get('error', r.get('skipped', ''))}"
    )


if __name__ == '__main__':
  main()
