"""The side files a dataset build writes next to its data, and their human-readable summary.

label_map.csv (label,<class column>,num_train_listed,num_validation_listed), skipped.csv
(id,<class column>,split,reason), missing.csv (id,<class column>,split) and summary.json (per
split: listed = written + skipped + missing, checked before writing).
"""

from __future__ import annotations

import collections
import csv
import logging
import os
from typing import Dict, Optional, Sequence, Tuple

from dolg_jax import atomic
from dolg_jax.data.build_plan import SPLITS, UNASSIGNED, BuildPlan, Record

SIDE_FILES = ('label_map.csv', 'skipped.csv', 'missing.csv', 'summary.json')


def write_side_files(
  out_dir: str,
  plan: BuildPlan,
  skipped: Sequence[Tuple[Record, str]],
  written: Dict[str, int],
  *,
  name: str,
  class_column: str,
  build_options: Optional[dict] = None,
  extra: Optional[dict] = None,
) -> dict:
  """label_map.csv, skipped.csv, missing.csv, summary.json; returns the summary dict.

  `class_column`: the name of the class key column (`landmark_id`, `class_name`). Records of
  split UNASSIGNED (skipped before the split) get their own per-split line. `extra` is added to
  the summary.
  """
  splits = SPLITS + ((UNASSIGNED,) if any(r.split == UNASSIGNED for r in plan.records) else ())
  counts = {s: collections.Counter() for s in splits}
  for rec in plan.records:
    counts[rec.split][rec.label] += 1
  with atomic.writing(
    os.path.join(out_dir, 'label_map.csv'), 'w', newline='', encoding='utf-8'
  ) as f:
    w = csv.writer(f)
    w.writerow(['label', class_column, 'num_train_listed', 'num_validation_listed'])
    for label, key in enumerate(plan.class_keys):
      w.writerow([label, key, counts['train'][label], counts['validation'][label]])
  with atomic.writing(os.path.join(out_dir, 'skipped.csv'), 'w', newline='', encoding='utf-8') as f:
    w = csv.writer(f)
    w.writerow(['id', class_column, 'split', 'reason'])
    for rec, reason in skipped:
      w.writerow([rec.id, rec.class_key, rec.split, reason])
  with atomic.writing(os.path.join(out_dir, 'missing.csv'), 'w', newline='', encoding='utf-8') as f:
    w = csv.writer(f)
    w.writerow(['id', class_column, 'split'])
    for rec in plan.missing:
      w.writerow([rec.id, rec.class_key, rec.split])
  written = {s: written.get(s, 0) for s in splits}
  listed = {s: sum(counts[s].values()) for s in splits}
  n_skipped = {s: sum(1 for r, _ in skipped if r.split == s) for s in splits}
  n_missing = {s: sum(1 for r in plan.missing if r.split == s) for s in splits}
  summary = {
    'dataset': name,
    'num_classes': len(plan.class_keys),
    'listed': sum(listed.values()),
    'duplicate_listings_ignored': plan.duplicates,
    'written': sum(written.values()),
    'skipped': sum(n_skipped.values()),
    'missing': len(plan.missing),
    'per_split': {
      s: {
        'listed': listed[s],
        'written': written[s],
        'skipped': n_skipped[s],
        'missing': n_missing[s],
      }
      for s in splits
    },
    'build_options': build_options,
    'excluded': plan.excluded,
    'shards_searched': list(plan.shards),
    'extracted_dir': plan.extracted_dir,
    'skipped_examples': [{'id': r.id, 'reason': why} for r, why in skipped[:20]],
    **(extra or {}),
  }
  for s in splits:
    per = summary['per_split'][s]
    if per['listed'] != per['written'] + per['skipped'] + per['missing']:
      raise AssertionError(f'{name} summary does not add up for split {s}: {per}')
  atomic.write_json(os.path.join(out_dir, 'summary.json'), summary, indent=1)
  logging.info('%s summary: %s', name, format_summary(summary))
  return summary


def format_summary(summary: dict) -> str:
  """Human-readable summary (printed by prepare)."""
  lines = [
    f"{summary['dataset']}: {summary['num_classes']} classes; listed {summary['listed']} = "
    f"written {summary['written']} + skipped {summary['skipped']} + missing "
    f"{summary['missing']}"
  ]
  for s, per in summary['per_split'].items():
    lines.append(
      f"  {s}: listed {per['listed']}, written {per['written']}, skipped "
      f"{per['skipped']}, missing {per['missing']}"
    )
  if summary.get('excluded'):
    ex = summary['excluded']
    lines.append(
      f"  exclusion list {ex['file']} (sha256 {ex['sha256'][:12]}): removed "
      f"{ex['images_removed']} listed images, "
      + (
        f"{ex['landmarks_removed']} landmarks"
        if 'landmarks_removed' in ex
        else f"{ex['classes_removed']} classes"
      )
    )
  if summary.get('duplicate_listings_ignored'):
    lines.append(
      f"  {summary['duplicate_listings_ignored']} duplicate CSV listings of an id were "
      'ignored (each id is used once)'
    )
  for warning in summary.get('warnings', []):
    lines.append(f'  warning: {warning}')
  for item in summary.get('skipped_examples', []):
    lines.append(f"  skipped {item['id']}: {item['reason']}")
  if summary['skipped'] > len(summary.get('skipped_examples', [])):
    lines.append('  ... (all skipped ids in skipped.csv)')
  return '\n'.join(lines)
