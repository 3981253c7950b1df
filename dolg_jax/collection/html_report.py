"""report.html of a search: each query (with its box) and its top k as thumbnails, score and path.

One self-contained page (thumbnails embedded as JPEG data URIs, `height` pixels high), so it can be
moved or mailed with results.json. Files are read with the index's limits (`reading`: no pixel bomb
is decoded); a result whose file cannot be read shows its path and score without a picture. Paths
are shown as text (HTML-escaped; bytes that are not UTF-8 as \\xNN).
"""

from __future__ import annotations

import base64
import html
import io
import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image
from PIL import ImageDraw

from dolg_jax.collection import files as files_lib
from dolg_jax.collection import reading


def thumbnail_uri(
  path: str,
  height: int,
  box: Optional[Sequence[float]] = None,
  limits: reading.Limits = reading.Limits(),
) -> Optional[str]:
  """A JPEG data URI of the image scaled to `height` (box drawn in blue), None if unreadable."""
  got = reading.read_image(path, limits)
  if got.image is None:
    return None
  im = Image.fromarray(np.ascontiguousarray(got.image))
  if box is not None:
    top, left, h, w = (float(v) for v in box)
    ImageDraw.Draw(im).rectangle(
      [left, top, left + w, top + h], outline=(40, 90, 220), width=max(2, im.height // 60)
    )
  scale = height / im.height
  im = im.resize((max(1, round(im.width * scale)), height), Image.BILINEAR)
  buf = io.BytesIO()
  im.save(buf, format='JPEG', quality=80)
  return 'data:image/jpeg;base64,' + base64.b64encode(buf.getvalue()).decode()


def _text(s: str) -> str:
  return html.escape(files_lib.escape(str(s)))


def _figure(uri: Optional[str], caption: str, border: str) -> str:
  img = (
    f'<img src="{uri}" style="border:3px solid {border}">'
    if uri
    else '<div style="width:96px;height:96px;background:#eee">unreadable</div>'
  )
  return (
    f'<figure style="display:inline-block;margin:4px;vertical-align:top;max-width:160px">'
    f'{img}<figcaption style="font:11px monospace;word-break:break-all">'
    f'{_text(caption)}</figcaption></figure>'
  )


def write(
  out_dir: str,
  index_dir: str,
  images_root: str,
  queries: Sequence[dict],
  boxes: Sequence[Optional[Sequence[float]]],
  height: int = 96,
  title: str = 'dolg_jax search',
  limits: reading.Limits = reading.Limits(),
) -> str:
  """Writes OUT_DIR/report.html. queries: results.json's entries ({'query', 'results'})."""
  parts = [
    '<html><head><meta charset="utf-8"><title>' + html.escape(title) + '</title></head>'
    f'<body><h1>{html.escape(title)}</h1><p>index: {_text(index_dir)} '
    f'(images under {_text(images_root)}); score = cosine similarity</p>'
  ]
  for q, box in zip(queries, boxes):
    parts.append(f'<h2>{_text(q["query"])}</h2><div>')
    parts.append(_figure(thumbnail_uri(q['query'], height, box, limits), 'query', '#285adc'))
    for rank, r in enumerate(q['results'], 1):
      uri = thumbnail_uri(os.path.join(images_root, r['path']), height, limits=limits)
      parts.append(_figure(uri, f'{rank}. {r["score"]:.4f} {r["path"]}', '#999'))
    parts.append('</div>')
  parts.append('</body></html>')
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, 'report.html')
  with open(path, 'w', encoding='utf-8') as f:
    f.write('\n'.join(parts))
  return path
