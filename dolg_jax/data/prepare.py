"""Builds a dataset from its manual download into a TFDS data dir (ArrayRecord, no TensorFlow).

  python -m dolg_jax.data.prepare --dataset=gldv2/clean --manual_dir=M --data_dir=D \
      [--allow_missing] [--verify_md5] [--val_fraction=F] [--exclude=FILE]

Datasets: gldv2/clean, gldv2/full (validation fraction 0.2), gldv2/clean_all, gldv2/full_all (every
image in train). --val_fraction and --exclude (CSV with a landmark_id and/or id column) build a
variant whose name (printed; put it in config.data.dataset) records them, e.g.
gldv2/clean_all-ex0123456789ab.
  python -m dolg_jax.data.prepare --dataset=gldv2_retrieval --manual_dir=M --data_dir=D

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
from dolg_jax.data import gldv2_retrieval


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m dolg_jax.data.prepare', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--dataset', default='gldv2/clean',
                      help='gldv2/clean, gldv2/full, gldv2/clean_all, gldv2/full_all or '
                      'gldv2_retrieval (index + test sets)')
  parser.add_argument('--manual_dir', required=True, help='directory holding the official files')
  parser.add_argument('--data_dir', required=True, help='TFDS data dir to write into')
  parser.add_argument('--allow_missing', action='store_true',
                      help='build even if listed images are absent (listed in missing.csv)')
  parser.add_argument('--verify_md5', action='store_true',
                      help='check every tar shard against its md5.images_NNN.txt first')
  parser.add_argument('--val_fraction', type=float, default=None,
                      help='validation fraction per class (default: the named config\'s; 0 = '
                           'every image in train)')
  parser.add_argument('--exclude', default=None,
                      help='CSV of landmark ids (column landmark_id) and/or image ids (column id) '
                           'to leave out, e.g. landmarks shared with the test sets')
  args = parser.parse_args(argv)
  if args.dataset == 'gldv2_retrieval':
    try:
      b = gldv2_retrieval.prepare(args.manual_dir, args.data_dir, allow_missing=args.allow_missing,
                                  verify_md5=args.verify_md5)
    except (gldv2.MissingImagesError, gldv2.TruncatedShardError, gldv2.ChecksumError,
            FileNotFoundError, ValueError) as e:
      print(f'error: {e}', file=sys.stderr)
      return 1
    print(json.dumps(b.summary or gldv2_retrieval.load_summary(args.data_dir), indent=1))
    print(f'data: {b.data_path} (retrieval_solution_v2.1.csv, skipped.csv, missing.csv, '
          'summary.json)')
    return 0
  if not args.dataset.startswith('gldv2'):
    parser.error(f'unsupported --dataset {args.dataset!r} (this command builds gldv2/clean, '
                 'gldv2/full, gldv2/clean_all and gldv2/full_all)')
  try:
    builder = gldv2.prepare(args.dataset, args.manual_dir, args.data_dir,
                            allow_missing=args.allow_missing, verify_md5=args.verify_md5,
                            val_fraction=args.val_fraction, exclude=args.exclude)
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
  print(f'dataset: gldv2/{builder.builder_config.name} (config.data.dataset)')
  print(f'data: {builder.data_path} (label_map.csv, skipped.csv, missing.csv, summary.json)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
