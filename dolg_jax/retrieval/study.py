"""A study table over several runs: our mAP beside the published DOLG numbers.

`write_study(workdirs, out_dir, compare_to='auto')` reads each run directory (its `manifest.json`,
dolg_jax.training.manifest, and the results.json of dolg_jax.eval: WORKDIR/eval/results.json, else
the latest WORKDIR/eval/step_N/results.json, else WORKDIR/results.json), groups runs that differ
only in IGNORED_FIELDS (`seed` and `config_rules.OPERATIONAL_FIELDS`; cells: mean and sample std
over the seeds), compares each group with one row of published_results.json (`choose_published`,
or the row `compare_to` names), writes study.md, study.csv, study.png and study.json into out_dir
and returns the paths and the table. Unusable runs or published data raise `StudyError`. How rows
are matched and which protocol differences are flagged: docs/design_notes.md.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import math
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from dolg_jax import config_rules as rules

PUBLISHED_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'published_results.json')
DATASETS = ('roxford5k', 'rparis6k')
DATASET_LABELS = {'roxford5k': 'ROxf', 'rparis6k': 'RPar'}
SETTINGS = ('base', '+1m')
PROTOCOLS = ('easy', 'medium', 'hard')
# (dataset, setting, protocol) in table order.
CELLS = tuple((d, s, p) for s in SETTINGS for d in DATASETS for p in PROTOCOLS)
OUR_QUERY_CROP = True

# Runs that differ only in these fields are repeats of one run (cells: mean and std over them).
IGNORED_FIELDS = rules.OPERATIONAL_FIELDS | {'seed'}
_STEP_DIR = re.compile(r'step_(\d+)$')


class StudyError(ValueError):
  """A run directory or the published data cannot be used (the message says which and why)."""


# ----------------------------------------------------------------------------- reading
@dataclasses.dataclass
class Run:
  """One evaluated run."""

  name: str
  workdir: str
  results_path: str
  config: Dict[str, Any]  # Flattened 'a.b' -> value (empty without a manifest).
  has_manifest: bool
  seed: Optional[int]
  maps: Dict[Tuple[str, str, str], float]  # (dataset, setting, protocol) -> mAP in percent.
  protocol: Dict[str, Any]


def flatten(tree: Mapping[str, Any], prefix: str = '') -> Dict[str, Any]:
  out = {}
  for k, v in tree.items():
    key = f'{prefix}{k}'
    if isinstance(v, Mapping):
      out.update(flatten(v, key + '.'))
    else:
      out[key] = tuple(v) if isinstance(v, list) else v
  return out


def find_results(workdir: str) -> str:
  """The results.json of a run directory (see the module docstring for the search order)."""
  first = os.path.join(workdir, 'eval', 'results.json')
  if os.path.isfile(first):
    return first
  steps = []
  for path in glob.glob(os.path.join(workdir, 'eval', 'step_*', 'results.json')):
    m = _STEP_DIR.search(os.path.dirname(path))
    if m:
      steps.append((int(m.group(1)), path))
  if steps:
    return max(steps)[1]
  last = os.path.join(workdir, 'results.json')
  if os.path.isfile(last):
    return last
  raise StudyError(
    f'{workdir}: no results.json (looked for eval/results.json, '
    'eval/step_N/results.json and results.json); evaluate the run first: '
    f'python -m dolg_jax.eval --config=CONFIG --workdir={workdir}'
  )


def _load_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise StudyError(f'{path}: not valid JSON ({e}); rerun the step that writes it') from e


def _training_set(manifest: Mapping[str, Any]) -> str:
  """The dataset name, e.g. 'gldv2/clean', 'gldv2/clean_all-ex0123456789ab' (the name encodes the
  validation fraction and the exclusion list; see dolg_jax.data.gldv2)."""
  dataset = manifest.get('dataset') or {}
  return str(dataset.get('name', manifest.get('config', {}).get('data', {}).get('dataset', '?')))


def read_run(workdir: str) -> Run:
  """Reads one run directory."""
  if not os.path.isdir(workdir):
    raise StudyError(f'{workdir}: not a directory')
  results_path = find_results(workdir)
  results = _load_json(results_path)
  if 'results' not in results or 'extraction' not in results:
    raise StudyError(
      f'{results_path}: not a dolg_jax.eval results.json (no "results" / "extraction" keys)'
    )
  maps = {}
  for d, sets in results['results'].items():
    for s, table in sets.items():
      for p in PROTOCOLS:
        if p in table:
          maps[(d, s, p)] = 100.0 * float(table[p]['map'])
  manifest_path = os.path.join(workdir, 'manifest.json')
  has_manifest = os.path.isfile(manifest_path)
  manifest = _load_json(manifest_path) if has_manifest else {}
  config = flatten(manifest.get('config', {}))
  search = results.get('search') or {}
  qe, dba = int(search.get('qe_k') or 0), int(search.get('dba_k') or 0)
  protocol = {
    'scales': tuple(float(x) for x in results['extraction'].get('scales', ())),
    'query_crop': OUR_QUERY_CROP,
    'plus_1m': bool(results.get('use_distractors')),
    'training_set': _training_set(manifest) if has_manifest else None,
    'search': 'none' if not (qe or dba) else f'qe_k={qe} dba_k={dba}',
  }
  seed = manifest.get('seeds', {}).get('seed', config.get('seed')) if has_manifest else None
  return Run(
    os.path.basename(os.path.normpath(workdir)),
    workdir,
    results_path,
    config,
    has_manifest,
    seed,
    maps,
    protocol,
  )


def load_published(path: str = PUBLISHED_PATH) -> dict:
  data = _load_json(path)
  for row in data['rows']:
    if row['source'] not in data['sources']:
      raise StudyError(f'{path}: row {row["id"]} names an unknown source {row["source"]!r}')
  return data


def published_maps(row: Mapping[str, Any]) -> Dict[Tuple[str, str, str], Optional[float]]:
  return {(d, s, p): row['map'].get(d, {}).get(s, {}).get(p) for d, s, p in CELLS}


# ----------------------------------------------------------------------------- grouping
@dataclasses.dataclass
class Group:
  """Runs that differ only in seed and bookkeeping, evaluated the same way."""

  runs: List[Run]
  mean: Dict[Tuple[str, str, str], float]
  std: Dict[Tuple[str, str, str], Optional[float]]
  n: Dict[Tuple[str, str, str], int]

  @property
  def label(self) -> str:
    return '+'.join(r.name for r in self.runs)

  @property
  def config(self) -> Dict[str, Any]:
    return self.runs[0].config

  @property
  def protocol(self) -> Dict[str, Any]:
    return self.runs[0].protocol


def _semantic(config: Mapping[str, Any]) -> Dict[str, Any]:
  return {k: v for k, v in config.items() if k not in IGNORED_FIELDS}


def _group_key(run: Run) -> str:
  proto = dict(run.protocol)
  if not run.has_manifest:  # Without a manifest nothing says two runs are alike.
    return json.dumps({'run': run.workdir})
  return json.dumps(
    {'config': _semantic(run.config), 'protocol': proto}, sort_keys=True, default=str
  )


def group_runs(runs: Sequence[Run]) -> List[Group]:
  """Groups runs that differ only in seed; cells: mean, sample std (n >= 2) and count."""
  order: List[str] = []
  members: Dict[str, List[Run]] = {}
  for run in runs:
    key = _group_key(run)
    if key not in members:
      order.append(key)
      members[key] = []
    members[key].append(run)
  groups = []
  for key in order:
    rs = members[key]
    mean, std, n = {}, {}, {}
    for cell in CELLS:
      vals = [r.maps[cell] for r in rs if cell in r.maps]
      if not vals:
        continue
      n[cell] = len(vals)
      mean[cell] = float(np.mean(vals))
      std[cell] = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    groups.append(Group(rs, mean, std, n))
  return groups


def differing_fields(groups: Sequence[Group]) -> List[str]:
  """Config fields (seed and bookkeeping excluded) whose value is not the same in every group."""
  with_config = [g for g in groups if g.runs[0].has_manifest]
  keys = sorted(set().union(*(_semantic(g.config) for g in with_config))) if with_config else []
  out = []
  for k in keys:
    values = {json.dumps(g.config.get(k, '<absent>'), default=str) for g in with_config}
    if len(values) > 1:
      out.append(k)
  return out


# ----------------------------------------------------------------------------- comparison
def _variant(config: Mapping[str, Any]) -> str:
  """The paper ablation a config is ('full' for the main model)."""
  return str(config.get('ablation', 'full'))


def protocol_differences(
  ours: Mapping[str, Any],
  published: Mapping[str, Any],
  published_cells: Mapping[Tuple[str, str, str], Optional[float]],
  our_cells: Sequence[Tuple[str, str, str]],
) -> Tuple[List[str], List[str]]:
  """(known differences, unknowns) between our protocol and a published row's."""
  diffs, unknown = [], []
  scales = published.get('scales')
  if scales is None:
    unknown.append('scales')
  elif [round(float(s), 4) for s in scales] != [round(float(s), 4) for s in ours['scales']]:
    diffs.append(
      f'scales {len(ours["scales"])} {list(ours["scales"])} vs {len(scales)} {list(scales)}'
    )
  if published.get('query_crop') is None:
    unknown.append('query crop')
  elif bool(published['query_crop']) != bool(ours['query_crop']):
    diffs.append('query crop' if ours['query_crop'] else 'no query crop')
    diffs[-1] += ' vs ' + ('crop' if published['query_crop'] else 'no crop')
  if ours['plus_1m'] and not any(
    published_cells[c] is not None for c in our_cells if c[1] == '+1m'
  ):
    diffs.append('+1M: not published')
  tset = ours.get('training_set')
  if tset is None:
    unknown.append('training set (no manifest)')
  elif published.get('training_set') and tset != published['training_set']:
    diffs.append(f'training set {tset} vs {published["training_set"]}')
  if ours.get('search', 'none') != published.get('search', 'none'):
    diffs.append(f'search {ours["search"]} vs {published.get("search", "none")}')
  return diffs, unknown


def choose_published(group: Group, published: dict, compare_to: str = 'auto') -> Optional[dict]:
  """The published row a group is compared with (None: no row of its depth and variant)."""
  rows = published['rows']
  if compare_to != 'auto':
    for row in rows:
      if row['id'] == compare_to:
        return row
    raise StudyError(
      f'--compare_to={compare_to!r} is not a published row; known: '
      f'{[r["id"] for r in rows]} or auto'
    )
  depth = group.config.get('model.depth')
  if depth is None:
    return None
  candidates = [r for r in rows if r['depth'] == depth and r['variant'] == _variant(group.config)]
  if not candidates:
    return None
  cells = list(group.mean)
  return min(
    candidates,
    key=lambda r: len(
      protocol_differences(group.protocol, r['protocol'], published_maps(r), cells)[0]
    ),
  )


# ----------------------------------------------------------------------------- the table
@dataclasses.dataclass
class StudyRow:
  kind: str  # 'ours' | 'published'
  label: str
  mean: Dict[Tuple[str, str, str], Optional[float]]
  std: Dict[Tuple[str, str, str], Optional[float]]
  n: int
  compared_to: str = ''
  delta: Dict[Tuple[str, str, str], Optional[float]] = dataclasses.field(default_factory=dict)
  fields: str = ''
  flags: str = ''
  seeds: str = ''


def build_study(
  runs: Sequence[Run], published: dict, compare_to: str = 'auto'
) -> Tuple[List[StudyRow], List[str]]:
  """(rows, differing config fields): our groups, each followed by its published row."""
  groups = group_runs(runs)
  fields = differing_fields(groups)
  rows: List[StudyRow] = []
  shown = set()
  for g in groups:
    pub = choose_published(g, published, compare_to)
    pub_cells = published_maps(pub) if pub else {}
    delta = {
      c: (g.mean[c] - pub_cells[c]) if pub and pub_cells.get(c) is not None else None
      for c in g.mean
    }
    if pub:
      diffs, unknown = protocol_differences(g.protocol, pub['protocol'], pub_cells, list(g.mean))
      flags = '; '.join(diffs + [f'{u}: published unknown' for u in unknown])
    else:
      flags = 'no published row of this depth/variant'
    if not g.runs[0].has_manifest:
      fields_txt = 'no manifest.json: config unknown'
    else:
      fields_txt = ', '.join(f'{k}={_fmt_value(g.config.get(k, "<absent>"))}' for k in fields)
    seeds = ','.join(str(r.seed) for r in g.runs)
    n = max(g.n.values()) if g.n else 0
    rows.append(
      StudyRow(
        'ours',
        g.label,
        dict(g.mean),
        dict(g.std),
        n,
        pub['id'] if pub else '',
        delta,
        fields_txt,
        flags or 'none',
        seeds,
      )
    )
    if pub and pub['id'] not in shown:
      shown.add(pub['id'])
      rows.append(
        StudyRow(
          'published',
          f'{pub["label"]} [{pub["id"]}]',
          pub_cells,
          {c: None for c in CELLS},
          0,
          flags=published['sources'][pub['source']].get('protocol_notes', ''),
        )
      )
  return rows, fields


def _fmt_value(v: Any) -> str:
  if isinstance(v, float):
    return f'{v:g}'
  if isinstance(v, tuple):
    return '(' + ','.join(_fmt_value(x) for x in v) + ')'
  return str(v)


def _cell_header(cell: Tuple[str, str, str]) -> str:
  d, s, p = cell
  return f'{DATASET_LABELS[d]}{"+1M" if s == "+1m" else ""} {p[0].upper()}'


def _used_cells(rows: Sequence[StudyRow]) -> List[Tuple[str, str, str]]:
  """Cells shown: every base cell; +1M cells only when some row has one."""
  return [c for c in CELLS if c[1] == 'base' or any(r.mean.get(c) is not None for r in rows)]


def _fmt_cell(row: StudyRow, cell) -> str:
  m = row.mean.get(cell)
  if m is None:
    return '--'
  text = f'{m:.2f}'
  s = row.std.get(cell)
  if s is not None:
    text += f' ± {s:.2f}'
  d = row.delta.get(cell)
  if d is not None:
    text += f' ({d:+.2f})'
  return text


def to_markdown(rows: Sequence[StudyRow], fields: Sequence[str]) -> str:
  cells = _used_cells(rows)
  head = ['row', 'n'] + [_cell_header(c) for c in cells] + ['compared to', 'fields', 'flags']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in rows:
    label = r.label if r.kind == 'ours' else f'*{r.label}*'
    values = [label, str(r.n) if r.kind == 'ours' else 'pub'] + [_fmt_cell(r, c) for c in cells]
    values += [r.compared_to, r.fields, r.flags]
    lines.append('| ' + ' | '.join(v.replace('|', '/') for v in values) + ' |')
  notes = [
    '',
    'mAP in percent: mean ± sample std over seeds (n runs), (delta to the compared '
    'published row); -- = not available / not published.',
    'Fields in which the rows differ (seed and bookkeeping excluded): '
    + (', '.join(fields) if fields else 'none')
    + '.',
  ]
  return '\n'.join(lines + notes) + '\n'


def write_csv(path: str, rows: Sequence[StudyRow], fields: Sequence[str]) -> None:
  with open(path, 'w', newline='') as f:
    w = csv.writer(f)
    header = ['kind', 'row', 'n', 'seeds', 'compared_to']
    for c in CELLS:
      key = f'{c[0]}{"+1m" if c[1] == "+1m" else ""}_{c[2]}'
      header += [f'{key}_mean', f'{key}_std', f'{key}_delta']
    header += ['fields', 'flags', 'differing_fields']
    w.writerow(header)
    for r in rows:
      line = [r.kind, r.label, r.n, r.seeds, r.compared_to]
      for c in CELLS:
        line += [_num(r.mean.get(c)), _num(r.std.get(c)), _num(r.delta.get(c))]
      line += [r.fields, r.flags, ';'.join(fields)]
      w.writerow(line)


def _num(v: Optional[float]) -> str:
  return '' if v is None else f'{v:.4f}'


_PALETTE = [
  (31, 119, 180),
  (255, 127, 14),
  (44, 160, 44),
  (214, 39, 40),
  (148, 103, 189),
  (140, 86, 75),
  (227, 119, 194),
  (127, 127, 127),
  (188, 189, 34),
  (23, 190, 207),
]


def render_chart(rows: Sequence[StudyRow], path: str) -> None:
  """Grouped bars: one group per table cell, one bar per row (published rows in lighter colours),
  error bars for the seed std; drawn with Pillow."""
  cells = [c for c in _used_cells(rows) if any(r.mean.get(c) is not None for r in rows)]
  n_rows = max(len(rows), 1)
  bar, gap, top, left, bottom = 10, 18, 20, 40, 40
  group_w = n_rows * bar + gap
  legend_h = 14 * n_rows + 10
  width = left + max(len(cells), 1) * group_w + 20
  height = top + 300 + bottom + legend_h
  img = Image.new('RGB', (max(width, 420), height), (255, 255, 255))
  draw = ImageDraw.Draw(img)
  y0, scale = top + 300, 3.0  # 100 % = 300 px
  for v in range(0, 101, 20):
    y = y0 - v * scale
    draw.line([(left, y), (img.width - 10, y)], fill=(225, 225, 225))
    draw.text((4, y - 6), f'{v}', fill=(0, 0, 0))
  for gi, cell in enumerate(cells):
    x = left + gi * group_w + gap // 2
    for ri, r in enumerate(rows):
      m = r.mean.get(cell)
      if m is None:
        continue
      colour = _PALETTE[ri % len(_PALETTE)]
      if r.kind == 'published':
        colour = tuple(int(c + (255 - c) * 0.55) for c in colour)
      bx = x + ri * bar
      draw.rectangle([bx, y0 - m * scale, bx + bar - 2, y0], fill=colour, outline=(60, 60, 60))
      s = r.std.get(cell)
      if s:
        cx = bx + bar // 2 - 1
        draw.line([(cx, y0 - (m + s) * scale), (cx, y0 - (m - s) * scale)], fill=(0, 0, 0))
    draw.text((x, y0 + 4), _cell_header(cell), fill=(0, 0, 0))
  ly = y0 + bottom
  for ri, r in enumerate(rows):
    colour = _PALETTE[ri % len(_PALETTE)]
    if r.kind == 'published':
      colour = tuple(int(c + (255 - c) * 0.55) for c in colour)
    draw.rectangle([left, ly + 14 * ri, left + 10, ly + 14 * ri + 10], fill=colour)
    draw.text((left + 16, ly + 14 * ri - 1), r.label[:110], fill=(0, 0, 0))
  img.save(path)


def write_study(
  workdirs: Sequence[str],
  out_dir: str,
  *,
  compare_to: str = 'auto',
  published_path: str = PUBLISHED_PATH,
) -> Dict[str, Any]:
  """Reads the runs, writes study.md/.csv/.png/.json into out_dir; returns paths and the table."""
  if not workdirs:
    raise StudyError('give at least one run directory')
  runs = [read_run(w) for w in workdirs]
  names = [r.name for r in runs]
  for i, r in enumerate(runs):  # Unique labels when two workdirs share a basename.
    if names.count(r.name) > 1:
      r.name = f'{r.name}#{i}'
  rows, fields = build_study(runs, load_published(published_path), compare_to)
  os.makedirs(out_dir, exist_ok=True)
  markdown = to_markdown(rows, fields)
  paths = {k: os.path.join(out_dir, f'study.{k}') for k in ('md', 'csv', 'png', 'json')}
  with open(paths['md'], 'w') as f:
    f.write(markdown)
  write_csv(paths['csv'], rows, fields)
  render_chart(rows, paths['png'])
  with open(paths['json'], 'w') as f:
    json.dump(
      {
        'differing_fields': fields,
        'runs': [
          {
            'name': r.name,
            'workdir': os.path.abspath(r.workdir),
            'results': os.path.abspath(r.results_path),
            'seed': r.seed,
          }
          for r in runs
        ],
        'rows': [
          {
            **{k: v for k, v in dataclasses.asdict(r).items() if k not in ('mean', 'std', 'delta')},
            **{
              k: {'/'.join(c): v for c, v in getattr(r, k).items()}
              for k in ('mean', 'std', 'delta')
            },
          }
          for r in rows
        ],
      },
      f,
      indent=1,
      default=_json_default,
    )
  return {'markdown': markdown, 'paths': paths, 'rows': rows, 'fields': fields}


def _json_default(v):
  if isinstance(v, float) and math.isnan(v):
    return None
  return str(v)
