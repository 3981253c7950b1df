r"""Builds a dataset from its manual download into a TFDS data dir (ArrayRecord, no TensorFlow).

  python -m dolg_jax.data.prepare --dataset=gldv2/clean --manual_dir=M --data_dir=D \
      [--allow_missing] [--verify_md5] [--val_fraction=F] [--exclude=FILE]
  python -m dolg_jax.data.prepare --dataset=gldv2_retrieval --manual_dir=M --data_dir=D
  python -m dolg_jax.data.prepare --dataset=roxford5k --manual_dir=M --data_dir=D [--allow_missing]
  python -m dolg_jax.data.prepare --verify --dataset=gldv2/clean --data_dir=D
  python -m dolg_jax.data.prepare --dataset=folder/NAME --manual_dir=DIR --data_dir=D \
      [--val_fraction=F] [--exclude=FILE] [--labels=CSV] [--allow_missing]

Datasets: gldv2/clean, gldv2/full (validation fraction 0.2), gldv2/clean_all, gldv2/full_all (every
image in train), gldv2_retrieval (the index and test sets of the GLDv2 retrieval benchmark),
roxford5k, rparis6k, revisitop1m, rdemo (revisitop layout: jpg/ and gnd_<name>.pkl, or
revisitop1m.txt and jpg/; see dolg_jax.data.revisitop).
--val_fraction and --exclude (CSV with a landmark_id and/or id column) build a variant whose name
(printed; put it in config.data.dataset) records them, e.g. gldv2/clean_all-ex0123456789ab.
--verify reads back every record of the prepared dataset and names each damaged file (exit 1 if
any; nothing is modified).
folder/NAME: your own labelled images, one sub-folder of DIR per class (or --labels=CSV with
path,label rows); see dolg_jax.data.folder. Warnings (empty or one-image classes, duplicates,
symlink loops) are printed as `warning:` lines.

Prints the summary (listed = written + skipped + missing, per split, and the skipped ids with
their reason); label_map.csv, skipped.csv, missing.csv and summary.json are written next to the
data.
Exit codes: 0 done, 1 a build or verification error (one line on stderr), 2 bad flags.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags
import tensorflow_datasets as tfds

from dolg_jax import cli
from dolg_jax.data import folder
from dolg_jax.data import gldv2
from dolg_jax.data import gldv2_retrieval
from dolg_jax.data import record_check
from dolg_jax.data import revisitop

_BUILD_ERRORS = (
  gldv2.MissingImagesError,
  gldv2.TruncatedShardError,
  gldv2.ChecksumError,
  revisitop.MissingImagesError,
  folder.FolderChangedError,
  FileNotFoundError,
  ValueError,
)
REVISITOP = revisitop.NAMES


def define_flags(fv: flags.FlagValues) -> None:
  """Defines the command-line flags on `fv` (at entry only)."""
  flags.DEFINE_string(
    'dataset',
    'gldv2/clean',
    'gldv2/clean, gldv2/full, gldv2/clean_all, '
    'gldv2/full_all, gldv2_retrieval (index + test sets), roxford5k, rparis6k, '
    'revisitop1m or rdemo (the demo benchmark, same layout).',
    flag_values=fv,
  )
  flags.DEFINE_string(
    'manual_dir', None, 'Directory holding the official files (to prepare).', flag_values=fv
  )
  flags.DEFINE_string('data_dir', None, 'TFDS data dir to write into.', flag_values=fv)
  flags.DEFINE_bool(
    'allow_missing',
    False,
    'Build even if listed images are absent (listed in missing.csv).',
    flag_values=fv,
  )
  flags.DEFINE_bool(
    'verify_md5', False, 'Check every tar shard against its md5 file first.', flag_values=fv
  )
  flags.DEFINE_float(
    'val_fraction',
    None,
    "Validation fraction per class (default: the named config's; 0 = every image in train).",
    flag_values=fv,
  )
  flags.DEFINE_string(
    'exclude',
    None,
    'CSV of landmark ids (column landmark_id) and/or image ids '
    '(column id) to leave out, e.g. landmarks shared with the test sets.',
    flag_values=fv,
  )
  flags.DEFINE_string(
    'labels',
    None,
    'folder/NAME only: CSV with path,label rows (paths relative '
    'to --manual_dir) instead of one sub-folder per class.',
    flag_values=fv,
  )
  flags.DEFINE_bool(
    'verify', False, 'Read back every record of the prepared dataset in --data_dir.', flag_values=fv
  )
  flags.mark_flag_as_required('data_dir', flag_values=fv)


def main(argv: list[str]) -> int:
  """Parses `argv` (program name first) and builds or verifies; returns the exit code."""
  fv = flags.FlagValues()
  define_flags(fv)
  if cli.help_requested(argv):
    return cli.print_help(__doc__, fv)
  cli.quiet_library_logs()
  tfds.display_progress_bar(False)  # our summary says what was built
  try:
    fv(argv)
    if not fv.verify and not fv.manual_dir:
      raise flags.ValidationError('--manual_dir is required (except with --verify)')
    if fv.labels and not folder.is_folder_dataset(fv.dataset):
      raise flags.ValidationError(f'--labels applies to folder/NAME only, not to {fv.dataset}')
    if folder.is_folder_dataset(fv.dataset) and fv.verify_md5:
      raise flags.ValidationError(f'--verify_md5: {fv.dataset} has no md5 files (gldv2* only)')
    if (
      not fv.dataset.startswith('gldv2')
      and fv.dataset not in REVISITOP
      and not folder.is_folder_dataset(fv.dataset)
    ):
      raise flags.ValidationError(
        f'unsupported --dataset {fv.dataset!r} (this command builds '
        'gldv2/clean, gldv2/full, gldv2/clean_all, gldv2/full_all, '
        f'gldv2_retrieval, {", ".join(REVISITOP)}, folder/NAME)'
      )
    if fv.dataset in REVISITOP + ('gldv2_retrieval',) and (
      fv.val_fraction is not None or fv.exclude
    ):
      raise flags.ValidationError(
        f'--val_fraction and --exclude apply to gldv2/* only, not to {fv.dataset}'
      )
    if fv.dataset in REVISITOP and fv.verify_md5:
      raise flags.ValidationError(f'--verify_md5: {fv.dataset} has no md5 files (gldv2* only)')
  except flags.Error as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if fv.verify:
    return verify(fv.dataset, fv.data_dir)
  try:
    if fv.dataset == 'gldv2_retrieval':
      return _prepare_retrieval(fv)
    if fv.dataset in REVISITOP:
      return _prepare_revisitop(fv)
    if folder.is_folder_dataset(fv.dataset):
      return _prepare_folder(fv)
    builder = gldv2.prepare(
      fv.dataset,
      fv.manual_dir,
      fv.data_dir,
      allow_missing=fv.allow_missing,
      verify_md5=fv.verify_md5,
      val_fraction=fv.val_fraction,
      exclude=fv.exclude,
    )
  except _BUILD_ERRORS as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  summary_path = os.path.join(os.fspath(builder.data_path), 'summary.json')
  summary = getattr(builder, 'summary', None)
  if summary is None:  # Already built earlier: report what that build recorded.
    print(f'{fv.dataset} is already prepared in {builder.data_path}')
    with open(summary_path) as f:
      summary = json.load(f)
  print(gldv2.format_summary(summary))
  print(f'dataset: gldv2/{builder.builder_config.name} (config.data.dataset)')
  print(f'data: {builder.data_path} (label_map.csv, skipped.csv, missing.csv, summary.json)')
  return 0


def _prepare_folder(fv: flags.FlagValues) -> int:
  b = folder.prepare(
    fv.dataset,
    fv.manual_dir,
    fv.data_dir,
    val_fraction=fv.val_fraction,
    exclude=fv.exclude,
    labels=fv.labels,
    allow_missing=fv.allow_missing,
  )
  summary = getattr(b, 'summary', None)
  if summary is None:
    print(
      f'{fv.dataset} is already prepared in {b.data_path} (with the same options; delete it '
      'to prepare it again)'
    )
    with open(os.path.join(os.fspath(b.data_path), 'summary.json')) as f:
      summary = json.load(f)
  for warning in summary.get('warnings', []):
    print(f'warning: {warning}', file=sys.stderr)
  print(gldv2.format_summary({**summary, 'warnings': []}))
  print(f'dataset: {fv.dataset} (config.data.dataset), {summary["num_classes"]} classes')
  print(f'data: {b.data_path} (label_map.csv, skipped.csv, missing.csv, summary.json)')
  return 0


def _prepare_retrieval(fv: flags.FlagValues) -> int:
  b = gldv2_retrieval.prepare(
    fv.manual_dir, fv.data_dir, allow_missing=fv.allow_missing, verify_md5=fv.verify_md5
  )
  print(json.dumps(b.summary or gldv2_retrieval.load_summary(fv.data_dir), indent=1))
  print(
    f'data: {b.data_path} (retrieval_solution_v2.1.csv, skipped.csv, missing.csv, summary.json)'
  )
  return 0


def _prepare_revisitop(fv: flags.FlagValues) -> int:
  b = revisitop.prepare(fv.dataset, fv.manual_dir, fv.data_dir, allow_missing=fv.allow_missing)
  print(json.dumps(revisitop.load_summary(fv.dataset, fv.data_dir), indent=1))
  print(f'data: {b.data_path} (summary.json)')
  return 0


def _builder(dataset: str, data_dir: str):
  if dataset == 'gldv2_retrieval':
    return gldv2_retrieval.builder(data_dir)
  if dataset in REVISITOP:
    return revisitop.builder(dataset, data_dir)
  if folder.is_folder_dataset(dataset):
    return folder.builder(dataset, data_dir)
  return gldv2.builder(dataset, data_dir)


def verify(dataset: str, data_dir: str) -> int:
  """Reads every record of the prepared `dataset`; prints the damaged files; 0 when none."""
  builder = _builder(dataset, data_dir)
  if not builder.is_prepared():
    print(f'error: {dataset} is not prepared in {builder.data_path}', file=sys.stderr)
    return 1
  result = record_check.verify_prepared(builder)
  for path, problem in sorted(result['damaged'].items()):
    print(f'DAMAGED {path}: {problem}')
  if result['damaged']:
    print(
      f'error: {len(result["damaged"])} of {result["files"]} files of {dataset} in '
      f'{builder.data_path} are damaged; prepare the dataset again (delete '
      f'{builder.data_path} first)',
      file=sys.stderr,
    )
    return 1
  print(
    f'{dataset}: {result["files"]} files, {result["records"]} records, all readable '
    f'({builder.data_path})'
  )
  return 0


def run() -> None:
  sys.exit(main(sys.argv))


if __name__ == '__main__':
  run()
