"""Visual retrieval report: an HTML page and a PNG grid (query crop + top-k, framed by label).

Frames: green = positive (easy or hard), red = negative, grey = junk (Medium protocol labels).
`write_report(out_dir, name, rows, summary)` renders given rows; `write_dataset_report` gathers the
rows of a prepared revisitop dataset (query crops, their top 10 and labels) and renders them.
"""

from __future__ import annotations

import html
import os
from typing import Sequence

import numpy as np
from PIL import Image

from dolg_jax.data import decode
from dolg_jax.data import revisitop
from dolg_jax.retrieval import extract as extract_lib
from dolg_jax.retrieval import scoring

COLOURS = {
  'pos': (40, 170, 60),
  'neg': (210, 40, 40),
  'junk': (150, 150, 150),
  'query': (40, 90, 220),
}
_CSS = {'pos': 'green', 'neg': 'red', 'junk': 'grey'}


def label_of(db_index: int, g: dict) -> str:
  """'pos' | 'junk' | 'neg' of a database index for one raw gnd entry (Medium protocol)."""
  if db_index in set(np.asarray(g['easy']).tolist()) | set(np.asarray(g['hard']).tolist()):
    return 'pos'
  if db_index in set(np.asarray(g['junk']).tolist()):
    return 'junk'
  return 'neg'


def thumbnail(img: np.ndarray, height: int, label: str, border: int = 4) -> Image.Image:
  """Image scaled to `height` (aspect kept) inside a coloured frame."""
  h, w = img.shape[:2]
  tw = max(1, int(round(w * height / h)))
  im = Image.fromarray(np.asarray(img, np.uint8)).resize((tw, height), Image.BILINEAR)
  framed = Image.new('RGB', (tw + 2 * border, height + 2 * border), COLOURS[label])
  framed.paste(im, (border, border))
  return framed


def render_grid(rows: Sequence[dict], height: int = 96, gap: int = 6) -> Image.Image:
  """rows: [{'query': HWC uint8, 'results': [(HWC uint8, label), ...]}] -> one PIL image."""
  tiles = []
  for row in rows:
    t = [thumbnail(row['query'], height, 'query')] + [
      thumbnail(im, height, lab) for im, lab in row['results']
    ]
    tiles.append(t)
  width = max(sum(t.width for t in r) + gap * len(r) for r in tiles) + gap if tiles else 1
  row_h = height + 8 + gap
  canvas = Image.new('RGB', (width, max(1, row_h * len(tiles) + gap)), (255, 255, 255))
  for r, row in enumerate(tiles):
    x = gap
    for k, t in enumerate(row):
      canvas.paste(t, (x, gap + r * row_h))
      x += t.width + gap + (2 * gap if k == 0 else 0)
  return canvas


def write_report(
  out_dir: str, name: str, rows: Sequence[dict], summary: str = ''
) -> tuple[str, str]:
  """Writes <out_dir>/<name>.png and <out_dir>/<name>.html; returns both paths.

  rows: as render_grid, plus 'query_name' and per result a name/score in 'result_meta'
  ([(name, score), ...]) and optionally 'ap'.
  """
  os.makedirs(out_dir, exist_ok=True)
  png = os.path.join(out_dir, f'{name}.png')
  render_grid(rows).save(png)
  parts = [
    f'<html><head><meta charset="utf-8"><title>{html.escape(name)}</title></head><body>',
    f'<h1>{html.escape(name)}</h1><pre>{html.escape(summary)}</pre>',
    '<p>Frames: <b style="color:green">positive</b>, <b style="color:red">negative</b>, '
    '<b style="color:grey">junk</b> (Medium protocol); blue = query crop.</p>',
    f'<img src="{html.escape(os.path.basename(png))}"><table border="1" cellpadding="3">',
    '<tr><th>query</th><th>AP (M)</th><th>top results (name, score, label)</th></tr>',
  ]
  for row in rows:
    meta = row.get('result_meta', [])
    cells = ', '.join(
      f'<span style="color:{_CSS[lab]}">{html.escape(str(n))} ({s:.3f})</span>'
      for (n, s), (_, lab) in zip(meta, row['results'])
    )
    ap = row.get('ap')
    parts.append(
      f'<tr><td>{html.escape(str(row.get("query_name", "")))}</td>'
      f'<td>{"" if ap is None else f"{ap:.4f}"}</td><td>{cells}</td></tr>'
    )
  parts.append('</table></body></html>')
  path = os.path.join(out_dir, f'{name}.html')
  with open(path, 'w') as f:
    f.write('\n'.join(parts))
  return path, png


def _images_by_index(src, wanted: set[int]) -> dict[int, dict]:
  out = {}
  for ex in revisitop.iter_examples(src):
    i = int(ex['index'])
    if i in wanted:
      out[i] = ex
  return out


def write_dataset_report(
  out_dir: str,
  name: str,
  data_dir: str,
  gnd_cfg: dict,
  topk,
  table: dict,
  n_queries: int,
  crop_rounding: str,
  search_cfg: dict,
) -> tuple[str, str]:
  """report_<name>.html/.png of the first `n_queries` queries with their top-k (`topk`, in the
  final order: re-ranked when `search_cfg` says so, which the summary line states)."""
  scores, idx = topk
  nq = min(n_queries, idx.shape[0])
  queries = _images_by_index(revisitop.data_source(name, data_dir, 'query'), set(range(nq)))
  wanted = {int(i) for i in idx[:nq].ravel()}
  index = _images_by_index(revisitop.data_source(name, data_dir, 'index'), wanted)
  rows = []
  for qi in range(nq):
    qex = queries[qi]
    img = decode.decode_rgb(qex['image'])
    y0, y1, x0, x1 = extract_lib.crop_box(qex['bbx'], img.shape[0], img.shape[1], crop_rounding)
    g = gnd_cfg['gnd'][qi]
    results, meta = [], []
    for s, i in zip(scores[qi], idx[qi]):
      ex = index[int(i)]
      results.append((decode.decode_rgb(ex['image']), label_of(int(i), g)))
      meta.append((ex['id'].decode() if isinstance(ex['id'], bytes) else ex['id'], float(s)))
    rows.append(
      {
        'query': img[y0:y1, x0:x1],
        'results': results,
        'result_meta': meta,
        'query_name': gnd_cfg['qimlist'][qi],
        'ap': table['medium']['aps'][qi],
      }
    )
  summary = scoring.format_table({name: {'base': table}}, search_cfg)
  return write_report(out_dir, f'report_{name}', rows, summary)
