"""The folder dataset (`folder/NAME`): a class-folder tree with every bad input the builder names,
a labels CSV, exclusion lists, a file vanishing during the build, and the prepare command."""

import csv
import json
import os
import shutil

import cv2
import pytest

from dolg_jax.data import csv_metadata
from dolg_jax.data import folder
from dolg_jax.data import gldv2
from dolg_jax.data import prepare
from tests.helpers import folder_images

EIFFEL, CAFE = 'Tour Eiffel', 'Café Roma'  # a space; a non-ASCII letter


def _tree(root: str) -> dict:
  """Good classes plus every bad input; returns what the build must report."""
  folder_images.write_classes(root, {EIFFEL: 6, 'one': 1, 'Zebra': 5})
  nested = os.path.join(root, CAFE, 'inside', 'deeper')  # any depth belongs to the class
  os.makedirs(nested)
  for i in range(4):
    cv2.imwrite(os.path.join(nested, f'{i}.png'), folder_images.image(50 + i, (200, 40, 40)))
  os.makedirs(os.path.join(root, 'empty'))  # an empty class folder
  os.makedirs(os.path.join(root, 'only text'))  # a class without a usable image
  with open(os.path.join(root, 'only text', 'notes.txt'), 'w') as f:
    f.write('not an image')
  shutil.copy(os.path.join(root, EIFFEL, '000.jpg'), os.path.join(root, 'one', 'dup.jpg'))
  shutil.copy(os.path.join(root, 'Zebra', '000.jpg'), os.path.join(root, 'Zebra', 'again.jpg'))
  os.symlink('../..', os.path.join(nested, 'loop'))  # a symlink loop
  os.symlink('self', os.path.join(root, EIFFEL, 'self'))  # a link to itself
  os.symlink('nowhere.jpg', os.path.join(root, EIFFEL, 'broken.jpg'))
  with open(os.path.join(root, EIFFEL, 'truncated.jpg'), 'wb') as f:
    with open(os.path.join(root, EIFFEL, '001.jpg'), 'rb') as g:
      f.write(g.read()[:300])
  with open(os.path.join(root, 'README.txt'), 'w') as f:  # not in a class folder
    f.write('photos')
  return {
    'classes': sorted([CAFE, EIFFEL, 'Zebra', 'one']),
    'skipped': {
      f'{EIFFEL}/000.jpg',
      'one/dup.jpg',
      'Zebra/again.jpg',
      f'{EIFFEL}/self',
      f'{EIFFEL}/broken.jpg',
      f'{EIFFEL}/truncated.jpg',
      'only text/notes.txt',
      'README.txt',
    },
  }


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('photos'))
  expected = _tree(root)
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  b = folder.prepare('folder/mine', root, data_dir)
  return {
    'root': root,
    'data_dir': data_dir,
    'builder': b,
    'summary': b.summary,
    'path': os.fspath(b.data_path),
    **expected,
  }


def _csv(path):
  with open(path, newline='', encoding='utf-8') as f:
    return list(csv.DictReader(f))


def test_counts_add_up_and_labels_are_sorted_class_names(built):
  s = built['summary']
  total_files = 16 + 2 + 2 + 2 + 1  # images, two copies, two links, two bad files, README
  assert s['listed'] == total_files == s['written'] + s['skipped'] + s['missing']
  for split, per in s['per_split'].items():
    assert per['listed'] == per['written'] + per['skipped'] + per['missing'], split
  assert s['num_classes'] == 4
  label_map = _csv(os.path.join(built['path'], 'label_map.csv'))
  assert [r['class_name'] for r in label_map] == built['classes']
  # Usable images per class: Café 4, Eiffel 5 (000.jpg is also in 'one'), Zebra 5, one 1.
  n = {
    r['class_name']: (int(r['num_train_listed']), int(r['num_validation_listed']))
    for r in label_map
  }
  assert n == {CAFE: (4, 0), EIFFEL: (4, 1), 'Zebra': (4, 1), 'one': (1, 0)}
  assert s['per_split']['train']['written'] == 13 and s['per_split']['validation']['written'] == 2
  assert s['build_options']['val_fraction'] == 0.2
  assert s['build_options']['manual_dir'] == os.path.abspath(built['root'])


def test_each_bad_input_is_named(built):
  skipped = {r['id']: r for r in _csv(os.path.join(built['path'], 'skipped.csv'))}
  assert set(skipped) == built['skipped']
  reasons = {k: r['reason'] for k, r in skipped.items()}
  assert 'symlink loop' in reasons[f'{EIFFEL}/self']
  assert 'broken symlink' in reasons[f'{EIFFEL}/broken.jpg']
  assert 'not a decodable image' in reasons[f'{EIFFEL}/truncated.jpg']
  assert 'not a decodable image' in reasons['only text/notes.txt']
  assert 'not in a class folder' in reasons['README.txt']
  assert "of class 'one'" in reasons[f'{EIFFEL}/000.jpg'] and 'ambiguous' in reasons['one/dup.jpg']
  assert 'same class' in reasons['Zebra/again.jpg']
  assert all(r['split'] == gldv2.UNASSIGNED for r in skipped.values())
  warnings = '\n'.join(built['summary']['warnings'])
  assert f"symlink loop: {CAFE}/inside/deeper/loop -> ../.. leads back to '{CAFE}'" in warnings
  assert 'more than one class' in warnings and f'{EIFFEL}/000.jpg = one/dup.jpg' in warnings
  assert 'more than once in one class' in warnings and 'Zebra/000.jpg = Zebra/again.jpg' in warnings
  assert "'empty'" in warnings and "'only text'" in warnings and 'not classes' in warnings
  assert "single image" in warnings and "'one'" in warnings


def test_records_hold_the_files_bytes_and_read_through_the_pipeline(built):
  sources = folder.builder('folder/mine', built['data_dir']).as_data_source()
  names = folder.read_label_map('folder/mine', built['data_dir'])
  seen = {}
  for split in ('train', 'validation'):
    src = sources[split]
    for i in range(len(src)):
      r = src[i]
      rel = r['id'].decode()
      with open(os.path.join(built['root'], rel), 'rb') as f:
        assert r['image'] == f.read()  # as stored (PNGs stay PNG)
      assert names[r['label']] == r['class_name'].decode() == rel.split('/')[0]
      seen[rel] = split
  assert len(seen) == 15 and f'{CAFE}/inside/deeper/0.png' in seen
  assert folder.num_classes('folder/mine', built['data_dir']) == 4


def test_split_is_seeded_per_class_name(built, tmp_path):
  """Adding a class does not move another class's images between the splits."""
  root = str(tmp_path / 'photos')
  shutil.copytree(built['root'], root, symlinks=True)
  folder_images.write_classes(root, {'Another': 5}, seed=9)
  b = folder.prepare('folder/more', root, str(tmp_path / 'tfds'))

  def split_of(data_dir, name):
    out = {}
    for split, src in folder.builder(name, data_dir).as_data_source().items():
      out.update({src[i]['id'].decode(): split for i in range(len(src))})
    return out

  before, after = (
    split_of(built['data_dir'], 'folder/mine'),
    split_of(str(tmp_path / 'tfds'), 'folder/more'),
  )
  assert {k: v for k, v in after.items() if not k.startswith('Another/')} == before
  assert b.summary['num_classes'] == 5


def _no_dataset_left(data_dir):
  return not os.path.exists(os.path.join(data_dir, 'folder'))


def test_file_vanishing_during_the_build_leaves_nothing(built, tmp_path, monkeypatch):
  root = str(tmp_path / 'photos')
  folder_images.write_classes(root, {'a': 3, 'b': 3})
  victim = os.path.join(root, 'b', '001.jpg')
  with open(victim, 'rb') as f:
    victim_bytes = f.read()
  real = folder.make_plan

  def plan_then_delete(*args, **kwargs):
    plan = real(*args, **kwargs)
    os.remove(victim)  # after every file was read and checked, before the records are written
    return plan

  monkeypatch.setattr(folder, 'make_plan', plan_then_delete)
  data_dir = str(tmp_path / 'tfds')
  with pytest.raises(
    folder.FolderChangedError,
    match=r'b/001\.jpg vanished while the dataset was '
    r'being written; nothing was written',
  ):
    folder.prepare('folder/v', root, data_dir, val_fraction=0.0)
  assert _no_dataset_left(data_dir)
  # With --allow_missing the build goes on and lists it.
  with open(victim, 'wb') as f:
    f.write(victim_bytes)
  b = folder.prepare('folder/v', root, data_dir, val_fraction=0.0, allow_missing=True)
  s = b.summary
  assert s['missing'] == 1 and s['listed'] == 6 == s['written'] + s['missing']
  assert [r['id'] for r in _csv(os.path.join(b.data_path, 'missing.csv'))] == ['b/001.jpg']
  assert any('b/001.jpg vanished' in w for w in s['warnings'])


def test_file_changing_during_the_build_is_an_error(tmp_path, monkeypatch):
  root = str(tmp_path / 'photos')
  folder_images.write_classes(root, {'a': 3})
  real = folder.make_plan

  def plan_then_change(*args, **kwargs):
    plan = real(*args, **kwargs)
    shutil.copy(os.path.join(root, 'a', '000.jpg'), os.path.join(root, 'a', '002.jpg'))
    return plan

  monkeypatch.setattr(folder, 'make_plan', plan_then_change)
  with pytest.raises(folder.FolderChangedError, match=r'a/002\.jpg changed while'):
    folder.prepare('folder/c', root, str(tmp_path / 'tfds'), allow_missing=True)
  assert _no_dataset_left(str(tmp_path / 'tfds'))


def _write(path, text):
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)
  return str(path)


def test_labels_csv_and_exclusion(tmp_path):
  root = str(tmp_path / 'flat')
  folder_images.write_classes(root, {'x': 6})
  labels = _write(
    tmp_path / 'labels.csv',
    'path,label\n'
    + ''.join(f'x/{i:03d}.jpg,{"Église" if i < 3 else "pont neuf"}\n' for i in range(6)),
  )
  b = folder.prepare('folder/lab', root, str(tmp_path / 'tfds'), labels=labels, val_fraction=0.0)
  assert b.summary['num_classes'] == 2 and b.summary['written'] == 6
  assert b.summary['build_options']['labels']['sha256'] == folder.read_labels(labels).sha256
  assert folder.read_label_map('folder/lab', str(tmp_path / 'tfds')) == ['pont neuf', 'Église']
  exclude = _write(tmp_path / 'ex.csv', 'label,path\npont neuf,\n,x/000.jpg\n')
  b = folder.prepare(
    'folder/ex', root, str(tmp_path / 'tfds'), labels=labels, exclude=exclude, val_fraction=0.0
  )
  assert b.summary['written'] == 2 and b.summary['num_classes'] == 1
  assert b.summary['excluded']['images_removed'] == 4
  assert b.summary['excluded']['classes_removed'] == 1
  # A listed file that is absent stops the build, naming it (or is listed with allow_missing).
  absent = _write(tmp_path / 'absent.csv', 'path,label\nx/000.jpg,a\nx/nope.jpg,a\n')
  with pytest.raises(
    gldv2.MissingImagesError,
    match=r'1 of 2 files listed in .*absent\.csv are '
    r'absent .*x/nope\.jpg',
  ):
    folder.prepare('folder/abs', root, str(tmp_path / 'tfds'), labels=absent)
  assert not os.path.exists(os.path.join(tmp_path, 'tfds', 'folder', 'abs'))


@pytest.mark.parametrize(
  'text, error',
  [
    (
      'path,label\nx/000.jpg,a\nx/000.jpg,b\n',
      r'labels\.csv:3: x/000\.jpg is listed again \(first '
      r'at line 2\)',
    ),
    ('path,label\n../x.jpg,a\n', r"labels\.csv:2: path '\.\./x\.jpg' is not a file below"),
    ('path,label\nx/000.jpg,\n', r'labels\.csv:2: empty label for x/000\.jpg'),
    ('path,label\nx/000.jpg,a,b\n', r'labels\.csv:2: 3 fields, the header has 2'),
    ('file,label\nx/000.jpg,a\n', r'labels\.csv:1: header .* lacks column\(s\) path'),
    ('path,label\nx,a\n', r'labels\.csv:2: x is a folder'),
  ],
)
def test_labels_csv_errors_name_file_and_line(tmp_path, text, error):
  root = str(tmp_path / 'flat')
  folder_images.write_classes(root, {'x': 1})
  labels = _write(tmp_path / 'labels.csv', text)
  with pytest.raises(csv_metadata.MetadataError, match=error):
    folder.prepare('folder/bad', root, str(tmp_path / 'tfds'), labels=labels)
  assert _no_dataset_left(str(tmp_path / 'tfds'))


def test_folder_errors(tmp_path):
  with pytest.raises(folder.FolderError, match='bad dataset name'):
    folder.prepare('folder/my photos', str(tmp_path), str(tmp_path / 'tfds'))
  root = str(tmp_path / 'nothing')
  os.makedirs(os.path.join(root, 'a'))
  _write(os.path.join(root, 'a', 'x.txt'), 'text')
  with pytest.raises(folder.FolderError, match='no usable image'):
    folder.prepare('folder/n', root, str(tmp_path / 'tfds'))
  root = str(tmp_path / 'nfc')
  folder_images.write_classes(root, {'Caf\u00e9': 1, 'Cafe\u0301': 1})  # NFC and NFD spellings
  with pytest.raises(folder.FolderError, match='same name after Unicode normalisation'):
    folder.prepare('folder/n', root, str(tmp_path / 'tfds'))
  assert _no_dataset_left(str(tmp_path / 'tfds'))


def test_prepare_command(built, tmp_path, capsys):
  data_dir = str(tmp_path / 'tfds')
  argv = [
    'prepare',
    '--dataset=folder/cmd',
    f'--manual_dir={built["root"]}',
    f'--data_dir={data_dir}',
    '--val_fraction=0.25',
  ]
  assert prepare.main(argv) == 0
  out = capsys.readouterr()
  assert 'dataset: folder/cmd (config.data.dataset), 4 classes' in out.out
  assert 'folder/cmd: 4 classes; listed 23 = written 15 + skipped 8 + missing 0' in out.out
  assert out.err.count('warning: ') == 5 and 'warning: symlink loop' in out.err
  assert 'Downloading and preparing' not in out.out + out.err  # TFDS' status lines: absl INFO
  assert prepare.main(argv) == 0  # again: already prepared, same summary
  assert 'already prepared' in capsys.readouterr().out
  assert prepare.main(argv[:-1] + ['--val_fraction=0.5']) == 1
  assert 'with other options (val_fraction: 0.25 then, 0.5 now)' in capsys.readouterr().err
  assert (
    prepare.main(
      [
        'prepare',
        '--dataset=gldv2/clean',
        '--manual_dir=x',
        f'--data_dir={data_dir}',
        '--labels=l.csv',
      ]
    )
    == 2
  )
  assert (
    prepare.main(['prepare', '--verify', '--dataset=folder/cmd', f'--data_dir={data_dir}']) == 0
  )
  with open(os.path.join(data_dir, 'folder', 'cmd', '1.0.0', 'summary.json')) as f:
    assert json.load(f)['build_options']['val_fraction'] == 0.25


def test_classes_too_small_for_validation_build_train_only(tmp_path):
  root = str(tmp_path / 'photos')
  folder_images.write_classes(root, {'a': 3, 'b': 4})
  b = folder.prepare('folder/small', root, str(tmp_path / 'tfds'))
  assert any(
    '(a class needs 5): the dataset has no validation split' in w for w in b.summary['warnings']
  )
  assert set(folder.builder('folder/small', str(tmp_path / 'tfds')).as_data_source()) == {'train'}
