"""Convert a released DOLG PyTorch checkpoint into a directory that loads without torch.

  python -m dolg_jax.convert --input R101_DOLG.pyth --output /ckpt/dolg_r101 \
      [--no-head] [--overwrite] [--allow-pickle]

Reads an official pycls `.pyth` container or a raw `.pth` state dict (torch needed here only), infers
the architecture (see dolg_jax.pretrained) and writes into --output:
  config.json        {"format": "dolg_jax.converted", "version": 1, "source", "has_head",
                      "model": the inferred c.model fields}
  variables.msgpack  {'params', 'batch_stats'} (flax.serialization msgpack, float32 numpy)
  head.msgpack       margin head {'weight': (num_classes, 512), 't': ()} unless --no-head
Then `dolg_jax.pretrained.load(OUTPUT) -> (model, variables)` and `pretrained.load_head(OUTPUT)`
read it with no torch import.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

from dolg_jax import pretrained


def convert(input_path: str, output_dir: str, *, include_head: bool = True,
            overwrite: bool = False, allow_pickle: bool = False) -> dict:
  """Converts `input_path` into `output_dir`; returns a summary dict (config, counts)."""
  if os.path.exists(os.path.join(output_dir, pretrained.CONFIG_FILE)) and not overwrite:
    raise FileExistsError(f'{output_dir} already holds a converted checkpoint; pass --overwrite')
  sd = pretrained.read_torch_state_dict(input_path, allow_pickle=allow_pickle)
  cfg, variables, head = pretrained.convert_state_dict(sd, input_path)
  pretrained.save_converted(output_dir, cfg, variables, head if include_head else None,
                            source=os.path.abspath(input_path))
  n_params = sum(int(np.prod(np.shape(v))) for v in jax.tree.leaves(variables['params']))
  return {'model': cfg.to_dict(), 'num_params': n_params,
          'head_shape': None if head is None or not include_head else tuple(head['weight'].shape)}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m dolg_jax.convert', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--input', required=True, help='official .pyth container or .pth state dict')
  parser.add_argument('--output', required=True, help='directory to write')
  parser.add_argument('--no-head', action='store_true', help='do not write the margin head')
  parser.add_argument('--overwrite', action='store_true', help='replace an existing conversion')
  parser.add_argument('--allow-pickle', action='store_true',
                      help='unpickle arbitrary Python objects in the file (trusted files only)')
  args = parser.parse_args(argv)
  try:
    summary = convert(args.input, args.output, include_head=not args.no_head,
                      overwrite=args.overwrite, allow_pickle=args.allow_pickle)
  except (pretrained.CheckpointError, FileExistsError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  m = summary['model']
  print(f'wrote {args.output}: R{m["depth"]} width {m["width"]}, multi-atrous '
        f'{m["use_multi_atrous"]}, GeM p {"learnable" if m["gem_p_learnable"] else "fixed"} '
        f'{m["gem_p"]:.4f}, {summary["num_params"] / 1e6:.3f}M params, head '
        f'{summary["head_shape"]}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
