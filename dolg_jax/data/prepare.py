"""Builds a dataset from its manual download into a TFDS data dir (ArrayRecord, no TensorFlow).

  python -m dolg_jax.data.prepare --dataset=gldv2/clean --manual_dir=M --data_dir=D \
      [--allow_missing] [--verify_md5]
  python -m dolg_jax.data.prepare --verify --dataset=gldv2/clean --data_dir=D

--verify reads back every record of the prepared dataset and names each damaged file (exit 1 if
any; nothing is modified).

Prints the summary (listed = written + skipped + missing, per split, and the skipped ids with
their reason); label_map.csv, skipped.csv, missing.csv and summary.json are written next to the data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from dolg_jax.data import gldv2
from dolg_jax.data import record_check


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m dolg_jax.data.prepare', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--dataset', default='gldv2/clean', help='gldv2/clean or gldv2/full')
  parser.add_argument('--manual_dir', help='directory holding the official files (to prepare)')
  parser.add_argument('--data_dir', required=True, help='TFDS data dir to write into')
  parser.add_argument('--allow_missing', action='store_true',
                      help='build even if listed images are absent (listed in missing.csv)')
  parser.add_argument('--verify_md5', action='store_true',
                      help='check every tar shard against its md5.images_NNN.txt first')
  parser.add_argument('--verify', action='store_true',
                      help='read back every record of the prepared dataset in --data_dir')
  args = parser.parse_args(argv)
  if args.verify:
    return verify(args.dataset, args.data_dir)
  if not args.manual_dir:
    parser.error('--manual_dir is required (except with --verify)')
  if not args.dataset.startswith('gldv2'):
    parser.error(f'unsupported --dataset {args.dataset!r} (this command builds gldv2/clean and '
                 'gldv2/full)')
  try:
    builder = gldv2.prepare(args.dataset, args.manual_dir, args.data_dir,
                            allow_missing=args.allow_missing, verify_md5=args.verify_md5)
  except (gldv2.MissingImagesError, gldv2.TruncatedShardError, gldv2.ChecksumError,
          FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  summary_path = os.path.join(os.fspath(builder.data_path), 'summary.json')
  summary = getattr(builder, 'summary', None)
  if summary is None:  # Already built earlier: report what that build recorded.
    print(f'{args.dataset} is already prepared in {builder.data_path}')
    with open(summary_path) as f:
      summary = json.load(f)
  print(gldv2.format_summary(summary))
  print(f'data: {builder.data_path} (label_map.csv, skipped.csv, missing.csv, summary.json)')
  return 0


def verify(dataset: str, data_dir: str) -> int:
  """Reads every record of the prepared `dataset`; prints the damaged files; 0 when none."""
  builder = gldv2.builder(dataset, data_dir)
  if not builder.is_prepared():
    print(f'error: {dataset} is not prepared in {builder.data_path}', file=sys.stderr)
    return 1
  result = record_check.verify_prepared(builder)
  for path, problem in sorted(result['damaged'].items()):
    print(f'DAMAGED {path}: {problem}')
  if result['damaged']:
    print(f'error: {len(result["damaged"])} of {result["files"]} files of {dataset} in '
          f'{builder.data_path} are damaged; prepare the dataset again (delete '
          f'{builder.data_path} first)', file=sys.stderr)
    return 1
  print(f'{dataset}: {result["files"]} files, {result["records"]} records, all readable '
        f'({builder.data_path})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
