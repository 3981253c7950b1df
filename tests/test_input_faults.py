"""Strict metadata parsing (dolg_jax.data.csv_metadata) and damaged prepared data
(dolg_jax.data.record_check, `prepare --verify`): each fault is injected into real-format files and
the error must name the file and line (or the damaged file) and the remedy."""

import os
import pickle
import shutil

import pytest

from dolg_jax.data import csv_metadata
from dolg_jax.data import gldv2
from dolg_jax.data import prepare
from dolg_jax.data import record_check
from dolg_jax.data import revisitop

A, B, C = 'a1b2c3d4e5f60718', '0123456789abcdef', 'fedcba9876543210'


def _write(tmp_path, name, data):
  path = tmp_path / name
  path.write_bytes(data if isinstance(data, bytes) else data.encode())
  return str(path)


def test_valid_files_parse(tmp_path):
  clean = _write(tmp_path, 'train_clean.csv', f'landmark_id,images\n1,{A} {B}\n7,{C}\n')
  assert csv_metadata.read_train_clean(clean) == [(A, 1), (B, 1), (C, 7)]
  full = _write(tmp_path, 'train.csv',
                f'id,url,landmark_id\n{A},"http://x/a,b.jpg",1\n{B},http://x/b.jpg,2\n')
  assert csv_metadata.read_train(full) == [(A, 1), (B, 2)]
  bom = _write(tmp_path, 'bom.csv', b'\xef\xbb\xbf' + f'landmark_id,images\n3,{A}\n'.encode())
  assert csv_metadata.read_train_clean(bom) == [(A, 3)]


@pytest.mark.parametrize('body, expected', [
    (f'1,{A},{B}\n', ':2: 3 fields, the header has 2 (a comma where a space belongs?'),
    (f'1,{A}\n2,"{B}\n', ':3: malformed CSV'),
    (f'1,{A}\n2,{B}"x\n', ':3: image id'),
    (f'1,{A}\nx7,{B}\n', ":3: landmark_id 'x7' is not a non-negative integer"),
    (f'1,{A}\n-2,{B}\n', ":3: landmark_id '-2' is not a non-negative integer"),
    (f'1,{A} {B[:15]}\n', f":2: image id '{B[:15]}' is not 16 lowercase hex digits"),
    (f'1,{A.upper()}\n', ':2: image id'),
    (f'1,{A}  {B}\n', ':2: empty image id'),
    ('1,\n', ':2: landmark 1 lists no images'),
])
def test_train_clean_faults(tmp_path, body, expected):
  path = _write(tmp_path, 'train_clean.csv', 'landmark_id,images\n' + body)
  with pytest.raises(csv_metadata.MetadataError) as e:
    csv_metadata.read_train_clean(path)
  assert str(e.value).startswith(path + ':'), str(e.value)
  assert expected in str(e.value)


def test_encoding_fault_names_line_and_byte(tmp_path):
  path = _write(tmp_path, 'train.csv',
                f'id,url,landmark_id\n{A},http://x,1\n{B},http://\xe9t\xe9,2\n'.encode('latin-1'))
  with pytest.raises(csv_metadata.MetadataError, match=r'train\.csv:3: not UTF-8 \(byte 0xe9 '
                     r'at column 25\)'):
    csv_metadata.read_train(path)


def test_header_faults(tmp_path):
  path = _write(tmp_path, 'train.csv', f'id;url;landmark_id\n{A};u;1\n')
  with pytest.raises(csv_metadata.MetadataError, match=r'train\.csv:1: header .* lacks column'):
    csv_metadata.read_train(path)
  empty = _write(tmp_path, 'train_clean.csv', '')
  with pytest.raises(csv_metadata.MetadataError, match=r'train_clean\.csv:1: empty file'):
    csv_metadata.read_train_clean(empty)


def test_prepare_reports_csv_fault(tmp_path, capsys):
  manual = tmp_path / 'manual'
  manual.mkdir()
  (manual / 'train_clean.csv').write_text(f'landmark_id,images\n1,{A},{B}\n')
  rc = prepare.main(['--manual_dir', str(manual), '--data_dir', str(tmp_path / 'out')])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 1 and err[-1].startswith(f'error: {manual}/train_clean.csv:2: 3 fields')


def _gnd():
  return {'imlist': ['a', 'b', 'c'], 'qimlist': ['q'],
          'gnd': [{'bbx': [0.0, 1.0, 5.0, 6.0], 'easy': [0], 'hard': [1], 'junk': []}]}


@pytest.mark.parametrize('mutate, expected', [
    (lambda g: g['gnd'][0].update(easy=[3]), 'gnd[0].easy holds 3, not an index into the 3'),
    (lambda g: g['gnd'][0].update(bbx=[1, 2]), 'gnd[0].bbx [1, 2] is not 4 numbers'),
    (lambda g: g.update(imlist=['a', None, 'c']), 'imlist[1] is None'),
    (lambda g: g['gnd'].append(g['gnd'][0]), '2 gnd entries but 1 queries'),
])
def test_gnd_faults(tmp_path, mutate, expected):
  g = _gnd()
  mutate(g)
  path = _write(tmp_path, 'gnd_roxford5k.pkl', pickle.dumps(g))
  with pytest.raises(csv_metadata.MetadataError) as e:
    revisitop.read_gnd_file(path)
  assert str(e.value).startswith(path) and expected in str(e.value)


def test_gnd_truncated_pickle(tmp_path):
  data = pickle.dumps(_gnd())
  path = _write(tmp_path, 'gnd_rparis6k.pkl', data[:len(data) // 2])
  with pytest.raises(csv_metadata.MetadataError, match='not a readable ground-truth pickle'):
    revisitop.read_gnd_file(path)
  assert revisitop.read_gnd_file(_write(tmp_path, 'ok.pkl', pickle.dumps(_gnd())))['imlist']


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  import train_testlib as tl
  return tl.ensure_fixture()


def test_verify_finds_damaged_array_record(prepared, tmp_path, capsys):
  data_dir = str(tmp_path / 'data')
  shutil.copytree(prepared, data_dir)
  assert prepare.main(['--verify', '--data_dir', data_dir]) == 0
  assert 'all readable' in capsys.readouterr().out
  builder = gldv2.builder('gldv2/clean', data_dir)
  path = os.path.join(os.fspath(builder.data_path), 'gldv2-train.array_record-00000-of-00001')
  size = os.path.getsize(path)
  with open(path, 'r+b') as f:      # zero a block in the middle of the file
    f.seek(size // 2)
    f.write(b'\0' * 64)
  assert prepare.main(['--verify', '--data_dir', data_dir]) == 1
  out, err = capsys.readouterr()
  assert f'DAMAGED {path}: ' in out and 'Corrupted Riegeli' in out
  assert 'validation' not in out                      # the intact file is not reported
  assert '1 of 2 files' in err
  # A read during training names the file and the command.
  source = record_check.NamedSource(builder.as_data_source()['train'], 'gldv2/clean', data_dir)
  with pytest.raises(record_check.DamagedRecordError) as e:
    for i in range(len(source)):
      source[i]
  assert path in str(e.value) and 'python -m dolg_jax.data.prepare --verify' in str(e.value)
