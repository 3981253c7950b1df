"""End-to-end tests of the gldv2 TFDS builder on the fixture (official layout, bad files in it)."""

import collections
import csv
import json
import math
import os
import shutil

import numpy as np
import pytest

from dolg_jax.data import decode
from dolg_jax.data import gldv2
from dolg_jax.data.synthetic import gldv2_fixture
from dolg_jax.data import prepare


@pytest.fixture(scope='module')
def fixture(tmp_path_factory):
  return gldv2_fixture.write_fixture(str(tmp_path_factory.mktemp('manual')), seed=0)


@pytest.fixture(scope='module')
def built(fixture, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('data'))
  rc = prepare.main(
    [
      'prepare',
      '--dataset=gldv2/clean',
      f'--manual_dir={fixture.manual_dir}',
      f'--data_dir={data_dir}',
      '--allow_missing',
      '--verify_md5',
    ]
  )
  assert rc == 0
  return data_dir


def _read_split(data_dir, split):
  src = gldv2.data_sources('gldv2/clean', data_dir)[split]
  return [src[i] for i in range(len(src))]


def _version_dir(data_dir):
  return os.fspath(gldv2.builder('gldv2/clean', data_dir).data_path)


def test_fixture_layout_is_official_and_deterministic(fixture, tmp_path):
  names = sorted(os.listdir(fixture.manual_dir))
  assert names == [
    'images_000.tar',
    'images_001.tar',
    'images_002.tar',
    'md5.images_000.txt',
    'md5.images_001.txt',
    'md5.images_002.txt',
    'train.csv',
    'train_clean.csv',
  ]
  with open(os.path.join(fixture.manual_dir, 'train.csv')) as f:
    assert f.readline().strip() == 'id,url,landmark_id'
  with open(os.path.join(fixture.manual_dir, 'train_clean.csv')) as f:
    assert f.readline().strip() == 'landmark_id,images'
  again = gldv2_fixture.write_fixture(str(tmp_path), seed=0)
  for name in names:
    with (
      open(os.path.join(fixture.manual_dir, name), 'rb') as a,
      open(os.path.join(again.manual_dir, name), 'rb') as b,
    ):
      assert a.read() == b.read(), name


def test_build_summary_adds_up_and_lists_bad_files(fixture, built):
  vdir = _version_dir(built)
  with open(os.path.join(vdir, 'summary.json')) as f:
    summary = json.load(f)
  n_clean = len(fixture.clean_ids)
  assert summary['listed'] == n_clean
  assert summary['missing'] == len(fixture.missing)
  assert summary['skipped'] == len(fixture.corrupt)
  assert summary['written'] == n_clean - len(fixture.missing) - len(fixture.corrupt)
  for per in summary['per_split'].values():
    assert per['listed'] == per['written'] + per['skipped'] + per['missing']
  with open(os.path.join(vdir, 'skipped.csv')) as f:
    skipped = {row['id']: row['reason'] for row in csv.DictReader(f)}
  assert set(skipped) == set(fixture.corrupt)
  assert all(reason for reason in skipped.values())
  with open(os.path.join(vdir, 'missing.csv')) as f:
    assert {row['id'] for row in csv.DictReader(f)} == set(fixture.missing)


def test_splits_labels_and_mapping(fixture, built):
  train, val = _read_split(built, 'train'), _read_split(built, 'validation')
  ids = {s: [r['id'].decode() for r in recs] for s, recs in (('train', train), ('val', val))}
  assert not set(ids['train']) & set(ids['val'])
  bad = set(fixture.missing) | set(fixture.corrupt)
  assert set(ids['train']) | set(ids['val']) == set(fixture.clean_ids) - bad
  landmarks = sorted(fixture.clean)
  assert gldv2.read_label_map('gldv2/clean', built) == landmarks
  assert gldv2.num_classes('gldv2/clean', built) == len(landmarks)
  val_count = collections.Counter()
  for r in train + val:
    assert r['label'] == landmarks.index(r['landmark_id'])
    assert r['id'].decode() in fixture.clean[r['landmark_id']]
  for r in val:
    val_count[r['landmark_id']] += 1
  # Validation gets floor(20%) of each class's LISTED images (minus bad ones that fell there).
  with open(os.path.join(_version_dir(built), 'label_map.csv')) as f:
    rows = list(csv.DictReader(f))
  for row in rows:
    lm = int(row['landmark_id'])
    n = len(fixture.clean[lm])
    assert int(row['num_validation_listed']) == math.floor(0.2 * n)
    assert int(row['num_train_listed']) == n - math.floor(0.2 * n)
    if n < 5:
      assert val_count[lm] == 0
  assert sum(val_count.values()) == len(val)


def test_split_is_seeded_and_stable():
  pairs = [(f'{i:016x}', i % 7) for i in range(200)]
  a, _ = gldv2.split_per_class(pairs, 0.2, seed=0)
  b, _ = gldv2.split_per_class(list(reversed(pairs)), 0.2, seed=0)
  c, _ = gldv2.split_per_class(pairs, 0.2, seed=1)
  split = lambda recs: {r.id: r.split for r in recs}
  assert split(a) == split(b)  # Independent of CSV order.
  assert split(a) != split(c)  # Depends on the seed.


def test_modes_decode_to_rgb_from_the_dataset(fixture, built):
  records = {
    r['id'].decode(): r for r in _read_split(built, 'train') + _read_split(built, 'validation')
  }
  for image_id in fixture.grayscale + fixture.cmyk + fixture.png:
    if image_id not in records:
      continue
    img = decode.decode_rgb(records[image_id]['image'])
    src = fixture.pixels[image_id].astype(float)
    assert img.shape == src.shape
    if image_id in fixture.grayscale:
      assert np.abs(img.astype(float) - src.mean(-1, keepdims=True)).mean() < 25
    else:
      assert np.abs(img.astype(float) - src).mean() < 6
  # Original bytes are kept: the PNG is stored as PNG.
  png_stored = [records[i]['image'][:4] for i in fixture.png if i in records]
  assert png_stored and all(b == b'\x89PNG' for b in png_stored)


def test_missing_images_stop_the_build(fixture, tmp_path, capsys):
  rc = prepare.main(
    [
      'prepare',
      '--dataset=gldv2/clean',
      f'--manual_dir={fixture.manual_dir}',
      f'--data_dir={tmp_path}',
    ]
  )
  err = capsys.readouterr().err
  assert rc == 1
  assert f'{len(fixture.missing)} of {len(fixture.clean_ids)} images' in err
  assert 'images_000.tar, images_001.tar, images_002.tar' in err
  assert sorted(fixture.missing)[0] in err or fixture.missing[0] in err
  assert '--allow_missing' in err
  assert not os.path.exists(os.path.join(tmp_path, 'gldv2', 'clean', '1.0.0'))


def _copy_manual(fixture, tmp_path):
  out = str(tmp_path / 'manual')
  shutil.copytree(fixture.manual_dir, out)
  return out


@pytest.mark.parametrize('cut', ['mid_member', 'between_members'])
def test_truncated_tar_names_the_shard(fixture, tmp_path, cut):
  manual = _copy_manual(fixture, tmp_path)
  shard = os.path.join(manual, 'images_001.tar')
  index = gldv2.index_shard(shard)
  loc = sorted(index.values(), key=lambda l: l.offset)[-1]
  size = loc.offset + loc.size // 2 if cut == 'mid_member' else loc.offset + loc.size + 512
  with open(shard, 'r+b') as f:
    f.truncate(size)
  with pytest.raises(gldv2.TruncatedShardError, match='images_001.tar'):
    gldv2.make_plan(manual, 'clean', val_fraction=0.2, seed=0, allow_missing=True)


def test_md5_mismatch_is_reported(fixture, tmp_path):
  manual = _copy_manual(fixture, tmp_path)
  gldv2.make_plan(manual, 'clean', val_fraction=0.2, seed=0, allow_missing=True, check_md5=True)
  with open(os.path.join(manual, 'md5.images_002.txt'), 'w') as f:
    f.write('0' * 32 + '  images_002.tar\n')
  with pytest.raises(gldv2.ChecksumError, match='images_002.tar'):
    gldv2.make_plan(manual, 'clean', val_fraction=0.2, seed=0, allow_missing=True, check_md5=True)


def test_full_config_and_extracted_tree(fixture, tmp_path):
  tree = str(tmp_path / 'tree')
  gldv2_fixture.extract_fixture(fixture.manual_dir, tree)
  plan = gldv2.make_plan(tree, 'full', val_fraction=0.2, seed=0, allow_missing=True)
  assert plan.shards == [] and plan.extracted_dir == os.path.join(tree, 'train')
  assert len(plan.records) == len(fixture.full_ids)
  assert plan.class_keys == sorted(fixture.full)
  assert {r.id for r in plan.missing} == set(fixture.missing)
  with pytest.raises(gldv2.MissingImagesError, match='extracted tree'):
    gldv2.make_plan(tree, 'full', val_fraction=0.2, seed=0)


def test_ensure_fixture_dataset_is_idempotent(tmp_path):
  b = gldv2_fixture.ensure_fixture_dataset(str(tmp_path), num_classes=3, images_per_class=5)
  assert b.is_prepared()
  n = len(b.as_data_source()['train'])
  b2 = gldv2_fixture.ensure_fixture_dataset(str(tmp_path), num_classes=3, images_per_class=5)
  assert len(b2.as_data_source()['train']) == n > 0
