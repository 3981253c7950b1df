"""The demo's datasets: procedural places written in the real GLDv2 and revisited-Oxford layouts.

`write_gldv2(manual_dir, spec)` writes the training places as GLDv2 (train.csv, train_clean.csv,
tar shards, md5 files); `write_revisited(root, name, spec)` writes other, disjoint places as
root/jpg/<name>.jpg and root/gnd_<name>.pkl: per query place easy / hard / junk index views, then
distractor places; each query is a view pasted into a cluttered frame, its `bbx` marking the view.
`DemoSpec` holds the sizes. Nothing demo-specific reads them: they go through the real builders
(`dolg_jax.data.gldv2`, `dolg_jax.data.revisitop`). Design notes: docs/design_notes.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle

import numpy as np
from PIL import Image

from dolg_jax.data.synthetic import demo_scenes
from dolg_jax.data.synthetic import gldv2_fixture


@dataclasses.dataclass(frozen=True)
class DemoSpec:
  """Sizes of the demo data (defaults: the README demo; tests use smaller ones)."""

  num_train_places: int = 120
  train_views: int = 20
  num_query_places: int = 20
  queries_per_place: int = 2
  easy_views: int = 3
  hard_views: int = 3
  junk_views: int = 1
  num_distractor_places: int = 40
  distractor_views: int = 2
  min_side: int = 112
  max_side: int = 176
  seed: int = 0


def _image_id(kind: str, k: int, seed: int) -> str:
  """A 16-hex-character id like GLDv2's, stable for (kind, k, seed)."""
  return hashlib.sha1(f'{kind}:{seed}:{k}'.encode()).hexdigest()[:16]


def _size(rng: np.random.Generator, spec: DemoSpec) -> tuple[int, int]:
  w, h = (int(v) for v in rng.integers(spec.min_side, spec.max_side + 1, size=2))
  return w, h


def write_gldv2(manual_dir: str, spec: DemoSpec) -> dict:
  """Training places as GLDv2 (train.csv, train_clean.csv, tar shards, md5 files)."""
  rng = np.random.default_rng([spec.seed, 1])
  full, payload = {}, {}
  for p in range(spec.num_train_places):
    place = demo_scenes.make_place(1_000_000 + spec.seed * 10_000 + p)
    landmark = 100 + 7 * p  # sparse ids, like GLDv2's, remapped by the builder
    ids = []
    for v in range(spec.train_views):
      image_id = _image_id('train', p * 1000 + v, spec.seed)
      difficulty = float(rng.uniform(0.1, 1.0))
      occlusion = float(rng.choice([0.0, 0.0, 0.1, 0.25]))
      img = demo_scenes.render_view(
        place,
        int(rng.integers(1 << 31)),
        size=_size(rng, spec),
        difficulty=difficulty,
        occlusion=occlusion,
      )
      payload[image_id] = demo_scenes.jpeg_bytes(img)
      ids.append(image_id)
    full[landmark] = ids
  gldv2_fixture.write_layout(
    manual_dir,
    full=full,
    clean=full,
    payload=payload,
    num_shards=max(1, min(8, spec.num_train_places // 20)),
  )
  return {'num_images': len(payload), 'num_classes': len(full)}


def write_revisited(root: str, name: str, spec: DemoSpec) -> dict:
  """Evaluation places in the revisitop layout: root/jpg/<name>.jpg and root/gnd_<name>.pkl."""
  rng = np.random.default_rng([spec.seed, 2])
  os.makedirs(os.path.join(root, 'jpg'), exist_ok=True)

  def save(image_name: str, img: Image.Image) -> None:
    with open(os.path.join(root, 'jpg', image_name + '.jpg'), 'wb') as f:
      f.write(demo_scenes.jpeg_bytes(img))

  def place(k: int) -> demo_scenes.Place:
    return demo_scenes.make_place(2_000_000 + spec.seed * 10_000 + k)

  index, groups = [], []
  kinds = (
    ('easy', spec.easy_views, 0.3, 0.0),
    ('hard', spec.hard_views, 0.85, 0.15),
    ('junk', spec.junk_views, 1.0, 0.45),
  )
  for p in range(spec.num_query_places):
    g = {'easy': [], 'hard': [], 'junk': []}
    for kind, count, difficulty, occlusion in kinds:
      for _ in range(count):
        g[kind].append(len(index))
        index.append((f'place{p:03d}_{kind}_{len(index):05d}', place(p), difficulty, occlusion))
    groups.append(g)
  for d in range(spec.num_distractor_places):
    for _ in range(spec.distractor_views):
      index.append(
        (
          f'other{d:03d}_{len(index):05d}',
          place(spec.num_query_places + d),
          float(rng.uniform(0.2, 0.9)),
          0.0,
        )
      )
  order = rng.permutation(len(index))  # the real lists are not grouped by landmark
  position = np.empty_like(order)
  position[order] = np.arange(len(order))
  imlist = []
  for i in order:
    image_name, pl, difficulty, occlusion = index[i]
    save(
      image_name,
      demo_scenes.render_view(
        pl,
        int(rng.integers(1 << 31)),
        size=_size(rng, spec),
        difficulty=difficulty,
        occlusion=occlusion,
      ),
    )
    imlist.append(image_name)

  qimlist, gnd = [], []
  for p in range(spec.num_query_places):
    for q in range(spec.queries_per_place):
      w, h = _size(rng, spec)
      view = demo_scenes.render_view(
        place(p), int(rng.integers(1 << 31)), size=(w, h), difficulty=0.4
      )
      # Clutter around the query view: a frame from a place that is not in the benchmark.
      fw, fh = int(w * rng.uniform(1.2, 1.6)), int(h * rng.uniform(1.2, 1.6))
      clutter = demo_scenes.make_place(3_000_000 + spec.seed * 10_000 + p * 10 + q)
      frame = demo_scenes.render_view(clutter, int(rng.integers(1 << 31)), size=(fw, fh))
      x1, y1 = int(rng.integers(0, fw - w + 1)), int(rng.integers(0, fh - h + 1))
      frame.paste(view, (x1, y1))
      image_name = f'query_place{p:03d}_{q}'
      save(image_name, frame)
      qimlist.append(image_name)
      g = groups[p]
      gnd.append(
        {
          'bbx': [float(x1), float(y1), float(x1 + w), float(y1 + h)],
          'easy': sorted(int(position[i]) for i in g['easy']),
          'hard': sorted(int(position[i]) for i in g['hard']),
          'junk': sorted(int(position[i]) for i in g['junk']),
        }
      )
  with open(os.path.join(root, f'gnd_{name}.pkl'), 'wb') as f:
    pickle.dump({'imlist': imlist, 'qimlist': qimlist, 'gnd': gnd}, f)
  return {'num_index': len(imlist), 'num_query': len(qimlist)}
