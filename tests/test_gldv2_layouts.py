"""The gldv2 builder on every download layout, with validation-fraction and exclusion options."""

import csv
import json
import math
import os
import shutil
import tarfile

import ml_collections
import pytest

from dolg_jax.data import gldv2
from dolg_jax.data.synthetic import gldv2_fixture
from dolg_jax.data import prepare
from dolg_jax.training import inputs

SMALL = dict(
  num_classes=4,
  images_per_class=(3, 6),
  num_shards=2,
  num_missing=1,
  num_corrupt=1,
  num_grayscale=0,
  num_cmyk=0,
  num_png=0,
  num_noisy_classes=1,
  size_range=(24, 40),
)


@pytest.fixture(scope='module')
def layouts(tmp_path_factory):
  root = tmp_path_factory.mktemp('layouts')
  return {
    layout: gldv2_fixture.write_fixture(str(root / layout), layout=layout, **SMALL)
    for layout in gldv2_fixture.LAYOUTS
  }


def _image_bytes(plan):
  handles = {}
  try:
    return {r.id: gldv2.read_bytes(r.location, handles) for r in plan.records if r.location}
  finally:
    for f in handles.values():
      f.close()


def test_every_layout_gives_the_same_plan_and_bytes(layouts):
  plans = {
    name: gldv2.make_plan(
      info.manual_dir, 'clean', val_fraction=0.2, seed=0, allow_missing=True, check_md5=True
    )
    for name, info in layouts.items()
  }
  assert plans['flat'].shards == ['images_000.tar', 'images_001.tar']
  assert (
    plans['official'].shards
    == plans['bucket'].shards
    == [os.path.join('train', 'images_000.tar'), os.path.join('train', 'images_001.tar')]
  )
  assert os.path.isfile(
    os.path.join(layouts['bucket'].manual_dir, 'md5sum', 'train', 'md5.images_001.txt')
  )
  reference = _image_bytes(plans['flat'])
  assert len(reference) == len(layouts['flat'].clean_ids) - 1  # one planted missing image
  for name, plan in plans.items():
    assert [(r.id, r.label, r.split) for r in plan.records] == [
      (r.id, r.label, r.split) for r in plans['flat'].records
    ], name
    assert _image_bytes(plan) == reference, name


def test_bucket_md5_mismatch_names_the_shard(layouts, tmp_path):
  manual = str(tmp_path / 'bucket')
  shutil.copytree(layouts['bucket'].manual_dir, manual)
  with open(os.path.join(manual, 'md5sum', 'train', 'md5.images_001.txt'), 'w') as f:
    f.write('0' * 32 + '  images_001.tar\n')
  with pytest.raises(gldv2.ChecksumError, match='images_001.tar'):
    gldv2.make_plan(manual, 'clean', val_fraction=0.2, seed=0, allow_missing=True, check_md5=True)
  os.remove(os.path.join(manual, 'md5sum', 'train', 'md5.images_001.txt'))
  with pytest.raises(FileNotFoundError, match='md5.images_001.txt not found'):
    gldv2.make_plan(manual, 'clean', val_fraction=0.2, seed=0, allow_missing=True, check_md5=True)


def test_official_layout_extracted_in_place_and_duplicate_shards(layouts, tmp_path):
  manual = str(tmp_path / 'official')
  shutil.copytree(layouts['official'].manual_dir, manual)
  train = os.path.join(manual, 'train')
  for name in ('images_000.tar', 'images_001.tar'):  # What the script does: tar -xf in train/.
    with tarfile.open(os.path.join(train, name)) as tar:
      tar.extractall(train, filter='data')
    os.remove(os.path.join(train, name))
  plan = gldv2.make_plan(manual, 'full', val_fraction=0.2, seed=0, allow_missing=True)
  assert plan.shards == [] and plan.extracted_dir == train
  assert {r.id for r in plan.missing} == set(layouts['official'].missing)
  dup = str(tmp_path / 'dup')
  shutil.copytree(layouts['official'].manual_dir, dup)
  shutil.copy(os.path.join(dup, 'train', 'images_000.tar'), dup)
  with pytest.raises(ValueError, match='images_000.tar is both at'):
    gldv2.make_plan(dup, 'clean', val_fraction=0.2, seed=0, allow_missing=True)


def test_config_names():
  assert gldv2.resolve_config('gldv2/clean').name == 'clean'
  assert gldv2.resolve_config('gldv2/clean', val_fraction=0.2).name == 'clean'
  assert gldv2.resolve_config('gldv2/clean', val_fraction=0).name == 'clean-val0'
  all_ = gldv2.resolve_config('gldv2/full_all')
  assert (all_.name, all_.subset, all_.val_fraction) == ('full_all', 'full', 0.0)
  c = gldv2.resolve_config('gldv2/clean_all-val0.15-ex0123456789ab')
  assert (c.subset, c.val_fraction, c.exclusion_tag, c.exclusion) == (
    'clean',
    0.15,
    '0123456789ab',
    None,
  )
  for bad in ('gldv2/cleaned', 'gldv2/clean-val', 'gldv2/clean-exABC', 'gldv2/clean-foo'):
    with pytest.raises(ValueError, match='gldv2'):
      gldv2.resolve_config(bad)
  with pytest.raises(ValueError, match='val_fraction'):
    gldv2.resolve_config('gldv2/clean', val_fraction=1.0)


def _write_exclusion(path, landmarks=(), ids=()):
  with open(path, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['landmark_id', 'id'])
    for lm in landmarks:
      w.writerow([lm, ''])
    for i in ids:
      w.writerow(['', i])
  return str(path)


def test_exclusion_list_errors(tmp_path):
  bad = tmp_path / 'bad.csv'
  bad.write_text('landmark,image\n1,2\n')
  with pytest.raises(ValueError, match=r'bad.csv:1: .* \(expected landmark_id and/or id\)'):
    gldv2.read_exclusion(str(bad))
  bad.write_text('landmark_id\nabc\n')
  with pytest.raises(ValueError, match=r"bad.csv:2: landmark_id 'abc' is not a non-negative"):
    gldv2.read_exclusion(str(bad))
  bad.write_text('landmark_id\n')
  with pytest.raises(ValueError, match='names no landmark_id'):
    gldv2.read_exclusion(str(bad))
  with pytest.raises(FileNotFoundError, match='nothere.csv'):
    gldv2.read_exclusion(str(tmp_path / 'nothere.csv'))


def _read(data_dir, dataset, split):
  src = gldv2.data_sources(dataset, data_dir)[split]
  return [src[i] for i in range(len(src))]


def test_all_images_in_train_on_the_official_layout(layouts, tmp_path, capsys):
  info = layouts['official']
  data_dir = str(tmp_path / 'data')
  rc = prepare.main(
    [
      'prepare',
      '--dataset=gldv2/clean_all',
      f'--manual_dir={info.manual_dir}',
      f'--data_dir={data_dir}',
      '--allow_missing',
      '--verify_md5',
    ]
  )
  assert rc == 0 and 'dataset: gldv2/clean_all' in capsys.readouterr().out
  sources = gldv2.data_sources('gldv2/clean_all', data_dir)
  assert set(sources) == {'train'}
  ids = {r['id'].decode() for r in _read(data_dir, 'gldv2/clean_all', 'train')}
  bad = set(info.missing) | set(info.corrupt)
  assert ids == set(info.clean_ids) - bad
  meta = gldv2.builder('gldv2/clean_all', data_dir).info.metadata
  assert meta['build_options'] == {
    'subset': 'clean',
    'val_fraction': 0.0,
    'split_seed': 0,
    'exclusion': None,
  }


def test_exclusion_and_val_fraction_build_recorded_in_metadata_and_manifest(
  layouts, tmp_path, capsys
):
  info = layouts['bucket']
  landmarks = sorted(info.clean)
  dropped_landmark = landmarks[1]
  dropped_image = info.clean[landmarks[3]][0]
  excl = _write_exclusion(tmp_path / 'shared.csv', [dropped_landmark, 999999999], [dropped_image])
  tag = gldv2.read_exclusion(excl).tag
  data_dir = str(tmp_path / 'data')
  rc = prepare.main(
    [
      'prepare',
      '--dataset=gldv2/clean',
      f'--manual_dir={info.manual_dir}',
      f'--data_dir={data_dir}',
      '--allow_missing',
      '--val_fraction=0.5',
      f'--exclude={excl}',
    ]
  )
  name = f'gldv2/clean-val0.5-ex{tag}'
  out = capsys.readouterr().out
  assert rc == 0 and f'dataset: {name}' in out and 'removed' in out
  # Reopened by its name alone (no exclusion file needed to read).
  b = gldv2.builder(name, data_dir)
  assert b.is_prepared()
  meta = b.info.metadata
  assert meta['build_options']['val_fraction'] == 0.5
  assert meta['build_options']['exclusion']['sha256'].startswith(tag)
  assert meta['excluded']['images_removed'] == len(info.clean[dropped_landmark]) + 1
  assert meta['excluded']['landmarks_removed'] == 1
  assert meta['excluded']['excluded_landmarks_not_listed'] == 1
  records = _read(data_dir, name, 'train') + _read(data_dir, name, 'validation')
  assert dropped_landmark not in {int(r['landmark_id']) for r in records}
  assert dropped_image not in {r['id'].decode() for r in records}
  label_map = gldv2.read_label_map(name, data_dir)
  assert label_map == [lm for lm in landmarks if lm != dropped_landmark]  # contiguous labels
  with open(os.path.join(os.fspath(b.data_path), 'label_map.csv')) as f:
    rows = list(csv.DictReader(f))
  for row in rows:  # floor(0.5 n) listed images of each class held out.
    n = int(row['num_train_listed']) + int(row['num_validation_listed'])
    assert int(row['num_validation_listed']) == math.floor(0.5 * n)
  with open(os.path.join(os.fspath(b.data_path), 'summary.json')) as f:
    assert json.load(f)['build_options']['exclusion']['file'] == os.path.abspath(excl)
  # The training run's dataset record (written into manifest.json) carries the options.
  config = ml_collections.ConfigDict({'data': {'dataset': name, 'data_dir': data_dir}})
  record = inputs.open_data(config).manifest
  assert record['name'] == name and record['build_options'] == dict(meta['build_options'])
  # A different exclusion file under this name is refused; an unbuilt tag needs its file.
  other = _write_exclusion(tmp_path / 'other.csv', [landmarks[0]])
  with pytest.raises(ValueError, match=f'sha256 starts with {tag}'):
    gldv2.builder(name, data_dir, exclude=other)
  with pytest.raises(ValueError, match='needs its exclusion list'):
    gldv2.prepare(f'gldv2/clean_all-ex{"0" * 12}', info.manual_dir, data_dir)
