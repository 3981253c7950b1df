"""Convert a released DOLG PyTorch checkpoint into a directory that loads without torch.

  python -m dolg_jax.convert --input R101_DOLG.pyth --output /ckpt/dolg_r101 \
      [--nohead] [--overwrite] [--allow_pickle]

Reads an official pycls `.pyth` container or a raw `.pth` state dict (torch needed here only),
infers the architecture (dolg_jax.weights.architecture) and writes --output in the layout of
dolg_jax.weights.converted: config.json, variables.msgpack and, unless --nohead, head.msgpack;
`dolg_jax.pretrained.load(OUTPUT)` / `load_head(OUTPUT)` read it with no torch import. Exit code 1
and one line on stderr for an unreadable input or an existing output without --overwrite; 2 for a
flag error.
"""

from __future__ import annotations

import sys

from absl import flags

from dolg_jax import cli
from dolg_jax.weights import released
from dolg_jax.weights import torch_format


def define_flags(fv: flags.FlagValues) -> None:
  """Defines the command-line flags on `fv` (at entry only)."""
  flags.DEFINE_string('input', None, 'Official .pyth container or .pth state dict.', flag_values=fv)
  flags.DEFINE_string('output', None, 'Directory to write.', flag_values=fv)
  flags.DEFINE_bool('head', True, 'Also write the margin head (--nohead: do not).', flag_values=fv)
  flags.DEFINE_bool('overwrite', False, 'Replace an existing conversion.', flag_values=fv)
  flags.DEFINE_bool(
    'allow_pickle',
    False,
    'Unpickle arbitrary Python objects in the file (trusted files only).',
    flag_values=fv,
  )
  flags.mark_flags_as_required(['input', 'output'], flag_values=fv)


def main(argv: list[str]) -> int:
  """Parses `argv` (program name first) and converts; returns the exit code."""
  fv = flags.FlagValues()
  define_flags(fv)
  if cli.help_requested(argv):
    return cli.print_help(__doc__, fv)
  cli.quiet_library_logs()
  try:
    fv(argv)
  except flags.Error as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  try:
    summary = released.convert_file(
      fv.input,
      fv.output,
      include_head=fv.head,
      overwrite=fv.overwrite,
      allow_pickle=fv.allow_pickle,
    )
  except (torch_format.CheckpointError, FileExistsError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  m = summary['model']
  print(
    f'wrote {fv.output}: R{m["depth"]} width {m["width"]}, multi-atrous '
    f'{m["use_multi_atrous"]}, GeM p {"learnable" if m["gem_p_learnable"] else "fixed"} '
    f'{m["gem_p"]:.4f}, {summary["num_params"] / 1e6:.3f}M params, head '
    f'{summary["head_shape"]}'
  )
  return 0


def run() -> None:
  sys.exit(main(sys.argv))


if __name__ == '__main__':
  run()
