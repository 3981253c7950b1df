"""revisitop TFDS builders on fixtures in the official layouts, and their failure messages."""

import os
import pickle
import shutil

import numpy as np
import pytest

from dolg_jax.data import decode, revisitop
from dolg_jax.data.synthetic import revisitop_fixture as fx

from tests.helpers.paths import GND_DIR as REAL_GND


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp('revisitop')
  manual = os.path.join(root, 'manual', 'roxford5k')
  cfg = fx.write_gnd_fixture(manual, 'roxford5k')
  data_dir = os.path.join(root, 'data')
  revisitop.prepare('roxford5k', manual, data_dir)
  r1m_manual = os.path.join(root, 'manual', 'revisitop1m')
  names = fx.write_r1m_fixture(r1m_manual, 7)
  revisitop.prepare('revisitop1m', r1m_manual, data_dir)
  return {
    'manual': manual,
    'cfg': cfg,
    'data_dir': data_dir,
    'r1m_manual': r1m_manual,
    'r1m_names': names,
  }


def test_fixture_layout_matches_the_real_ground_truth(built):
  manual = built['manual']
  with open(os.path.join(manual, 'gnd_roxford5k.pkl'), 'rb') as f:
    cfg = pickle.load(f)
  for n in cfg['imlist'] + cfg['qimlist']:
    assert os.path.isfile(os.path.join(manual, 'jpg', n + '.jpg'))
  real_path = os.path.join(REAL_GND, 'gnd_roxford5k.pkl')
  if os.path.exists(real_path):
    with open(real_path, 'rb') as f:
      real = pickle.load(f)
    assert sorted(cfg) == sorted(real)
    assert sorted(cfg['gnd'][0]) == sorted(real['gnd'][0])
    for key in ('easy', 'hard', 'junk'):
      assert isinstance(cfg['gnd'][0][key], type(real['gnd'][0][key]))
    assert len(cfg['gnd'][0]['bbx']) == len(real['gnd'][0]['bbx']) == 4
  with open(os.path.join(built['r1m_manual'], 'revisitop1m.txt')) as f:
    listed = f.read().split()
  assert listed == built['r1m_names']
  assert all(os.path.isfile(os.path.join(built['r1m_manual'], 'jpg', n)) for n in listed)


def test_splits_hold_original_bytes_ids_and_boxes(built):
  cfg, manual, data_dir = built['cfg'], built['manual'], built['data_dir']
  for split, names in (('index', cfg['imlist']), ('query', cfg['qimlist'])):
    src = revisitop.data_source('roxford5k', data_dir, split)
    assert len(src) == len(names)
    seen = set()
    for ex in revisitop.iter_examples(src):
      i = int(ex['index'])
      seen.add(i)
      name = names[i]
      assert ex['id'].decode() == name
      with open(os.path.join(manual, 'jpg', name + '.jpg'), 'rb') as f:
        assert ex['image'] == f.read()
      h, w = decode.image_size(ex['image'])
      assert (ex['height'], ex['width']) == (h, w)
      if split == 'query':
        np.testing.assert_allclose(ex['bbx'], np.float32(cfg['gnd'][i]['bbx']))
      else:
        np.testing.assert_array_equal(ex['bbx'], [0, 0, w, h])
    assert seen == set(range(len(names)))
  gnd = revisitop.load_gnd('roxford5k', data_dir)
  assert gnd['imlist'] == cfg['imlist'] and gnd['gnd'][1]['easy'] == cfg['gnd'][1]['easy']
  summary = revisitop.load_summary('roxford5k', data_dir)
  assert summary['num_index'] == len(cfg['imlist']) and summary['num_missing'] == 0
  assert summary['matches_official_counts'] is False  # a fixture, not the 4,993 + 70 images
  r1m = revisitop.data_source('revisitop1m', data_dir, 'index')
  assert sorted(ex['id'].decode() for ex in revisitop.iter_examples(r1m)) == sorted(
    built['r1m_names']
  )


def test_missing_images_are_named(built, tmp_path):
  manual = os.path.join(tmp_path, 'roxford5k')
  shutil.copytree(built['manual'], manual)
  cfg = built['cfg']
  gone = [cfg['imlist'][3], cfg['imlist'][7], cfg['qimlist'][0]]
  for n in gone:
    os.remove(os.path.join(manual, 'jpg', n + '.jpg'))
  with pytest.raises(revisitop.MissingImagesError) as err:
    revisitop.prepare('roxford5k', manual, os.path.join(tmp_path, 'd1'))
  msg = str(err.value)
  assert f'3 of {len(cfg["imlist"]) + len(cfg["qimlist"])}' in msg
  assert all(n in msg for n in gone)
  b = revisitop.prepare('roxford5k', manual, os.path.join(tmp_path, 'd2'), allow_missing=True)
  assert len(b.as_data_source()['index']) == len(cfg['imlist']) - 2
  assert revisitop.load_summary('roxford5k', os.path.join(tmp_path, 'd2'))['num_missing'] == 3


def test_real_ground_truth_counts_checked(tmp_path):
  for name, (n_index, n_query) in (('roxford5k', (4993, 70)), ('rparis6k', (6322, 70))):
    src = os.path.join(REAL_GND, f'gnd_{name}.pkl')
    if not os.path.exists(src):
      pytest.skip(f'real ground truth {src} is absent')
    manual = os.path.join(tmp_path, name)
    os.makedirs(os.path.join(manual, 'jpg'))
    shutil.copy(src, manual)
    cfg = revisitop.read_gnd_file(os.path.join(manual, f'gnd_{name}.pkl'))
    assert (len(cfg['imlist']), len(cfg['qimlist'])) == (n_index, n_query)
    with pytest.raises(revisitop.MissingImagesError, match=r'of \d+ listed images are missing'):
      revisitop.prepare(name, manual, os.path.join(tmp_path, 'data'))


def test_r1m_missing_and_bad_inputs(built, tmp_path):
  manual = os.path.join(tmp_path, 'r1m')
  shutil.copytree(built['r1m_manual'], manual)
  os.remove(os.path.join(manual, 'jpg', built['r1m_names'][2]))
  with pytest.raises(revisitop.MissingImagesError, match=r'1 of 7 .*r1m_0000002'):
    revisitop.prepare('revisitop1m', manual, os.path.join(tmp_path, 'd'))
  with pytest.raises(FileNotFoundError, match='gnd_rparis6k.pkl'):
    revisitop.prepare('rparis6k', str(tmp_path), os.path.join(tmp_path, 'd'))
  with pytest.raises(ValueError, match='unknown revisitop dataset'):
    revisitop.builder('oxford105k')
