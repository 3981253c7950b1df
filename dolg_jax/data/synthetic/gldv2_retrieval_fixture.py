"""A small, deterministic GLDv2 retrieval benchmark (index + test) in the exact official layout.

`write_fixture(manual_dir, ...)` writes index.csv and test.csv (id), retrieval_solution_v2.1.csv
(id,images,Usage), index/ and test/ images_NNN.tar (members a/b/c/<id>.jpg) with their
md5.images_NNN.txt. Each test query shows one of `num_landmarks` landmarks and its solution lists
that landmark's index images (the others are unrelated); queries alternate Public / Private,
`num_ignored` are Usage Ignored (images None). Planted: `num_missing_test` test images in no tar,
one undecodable index image (in no query's solution). The returned FixtureInfo says which image
shows which landmark, so tests can make descriptors with a known mAP@100.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, List

import numpy as np

from dolg_jax.data.synthetic import gldv2_fixture
from dolg_jax.data.synthetic import revisitop_fixture


@dataclasses.dataclass
class FixtureInfo:
  manual_dir: str
  index_ids: List[str]
  test_ids: List[str]
  index_landmark: Dict[str, int]  # index id -> landmark (-1: unrelated)
  test_landmark: Dict[str, int]  # test id -> landmark (-1: ignored query)
  public: Dict[str, List[str]]
  private: Dict[str, List[str]]
  ignored: List[str]
  missing_test: List[str]
  corrupt_index: List[str]


def write_fixture(
  manual_dir: str,
  *,
  num_landmarks: int = 4,
  index_per_landmark: int = 3,
  num_unrelated: int = 5,
  queries_per_landmark: int = 2,
  num_ignored: int = 1,
  num_missing_test: int = 1,
  num_index_shards: int = 3,
  num_test_shards: int = 2,
  size_range=(40, 72),
  seed: int = 0,
  landmark_colours: bool = False,
) -> FixtureInfo:
  """Writes the fixture (deterministic in its arguments) and returns what is where.

  Images are random smooth textures; with `landmark_colours` each shows its landmark's colour
  (revisitop_fixture.PALETTE, unrelated images and ignored queries grey) plus pixel noise, so a
  mean-colour descriptor retrieves every query's relevant images first (mAP@100 = 1 per present
  query).
  """
  rng = np.random.default_rng(seed)
  new_id = gldv2_fixture.unique_ids(rng)

  def image(lm: int) -> bytes:
    h, w = (int(x) for x in rng.integers(size_range[0], size_range[1] + 1, size=2))
    if landmark_colours:
      palette = revisitop_fixture.PALETTE
      colour = palette[lm % len(palette)] if lm >= 0 else revisitop_fixture.GREY
      return revisitop_fixture.jpeg_bytes(colour + rng.normal(0, 8.0, (h, w, 3)), 90)
    return gldv2_fixture._encode(gldv2_fixture._smooth_image(rng, h, w), 'rgb', 90)

  index_landmark = {}
  for lm in range(num_landmarks):
    for _ in range(index_per_landmark):
      index_landmark[new_id()] = lm
  for _ in range(num_unrelated):
    index_landmark[new_id()] = -1
  index_ids = list(index_landmark)
  index_ids = [index_ids[i] for i in rng.permutation(len(index_ids))]
  test_landmark = {}
  for lm in range(num_landmarks):
    for _ in range(queries_per_landmark):
      test_landmark[new_id()] = lm
  for _ in range(num_ignored):
    test_landmark[new_id()] = -1
  test_ids = list(test_landmark)
  test_ids = [test_ids[i] for i in rng.permutation(len(test_ids))]

  landmark_of = {**index_landmark, **test_landmark}
  payload = {i: image(landmark_of[i]) for i in index_ids + test_ids}
  corrupt = [next(i for i in index_ids if index_landmark[i] == -1)]
  payload[corrupt[0]] = payload[corrupt[0]][:40]
  scored = [t for t in test_ids if test_landmark[t] >= 0]
  missing = scored[:num_missing_test]
  for t in missing:
    del payload[t]

  public, private, ignored = {}, {}, []
  os.makedirs(manual_dir, exist_ok=True)
  for split, ids, n in (
    ('index', index_ids, num_index_shards),
    ('test', test_ids, num_test_shards),
  ):
    folder = os.path.join(manual_dir, split)  # md5 files beside the shards
    gldv2_fixture.write_shards(folder, folder, ids, payload, n)
  rows = []
  for k, t in enumerate(test_ids):
    lm = test_landmark[t]
    if lm < 0:
      ignored.append(t)
      rows.append(f'{t},None,Ignored')
      continue
    relevant = [i for i in index_ids if index_landmark[i] == lm]
    (public if k % 2 == 0 else private)[t] = relevant
    rows.append(f'{t},{" ".join(relevant)},{"Public" if k % 2 == 0 else "Private"}')
  with open(os.path.join(manual_dir, 'retrieval_solution_v2.1.csv'), 'w') as f:
    f.write('id,images,Usage\n' + '\n'.join(rows) + '\n')
  for name, ids in (('index.csv', index_ids), ('test.csv', test_ids)):
    with open(os.path.join(manual_dir, name), 'w') as f:
      f.write('id\n' + ''.join(f'{i}\n' for i in ids))
  return FixtureInfo(
    manual_dir,
    index_ids,
    test_ids,
    index_landmark,
    test_landmark,
    public,
    private,
    ignored,
    missing,
    corrupt,
  )
