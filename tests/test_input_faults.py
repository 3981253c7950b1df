"""Strict metadata parsing (dolg_jax.data.csv_metadata) and damaged prepared data
(dolg_jax.data.record_check, `prepare --verify`): each fault is injected into real-format files and
the error must name the file and line (or the damaged file) and the remedy."""

import os
import pickle
import shutil

import pytest

from configs import default
from configs import tiny
from dolg_jax.data import csv_metadata
from dolg_jax.data import gldv2
from dolg_jax.data import gldv2_retrieval
from dolg_jax.data import prepare
from dolg_jax.data import record_check
from dolg_jax.data import revisitop
from dolg_jax.data.synthetic import revisitop_fixture as fx
from dolg_jax.retrieval import evaluate
from dolg_jax.training import failures
from dolg_jax.training import loop

A, B, C = 'a1b2c3d4e5f60718', '0123456789abcdef', 'fedcba9876543210'
D, E = '00000000000000d0', '00000000000000e0'


def _write(tmp_path, name, data):
  path = tmp_path / name
  path.write_bytes(data if isinstance(data, bytes) else data.encode())
  return str(path)


def test_valid_files_parse(tmp_path):
  clean = _write(tmp_path, 'train_clean.csv', f'landmark_id,images\n1,{A} {B}\n7,{C}\n')
  assert csv_metadata.read_train_clean(clean) == [(A, 1), (B, 1), (C, 7)]
  full = _write(
    tmp_path, 'train.csv', f'id,url,landmark_id\n{A},"http://x/a,b.jpg",1\n{B},http://x/b.jpg,2\n'
  )
  assert csv_metadata.read_train(full) == [(A, 1), (B, 2)]
  bom = _write(tmp_path, 'bom.csv', b'\xef\xbb\xbf' + f'landmark_id,images\n3,{A}\n'.encode())
  assert csv_metadata.read_train_clean(bom) == [(A, 3)]


@pytest.mark.parametrize(
  'body, expected',
  [
    (f'1,{A},{B}\n', ':2: 3 fields, the header has 2 (a comma where a space belongs?'),
    (f'1,{A}\n2,"{B}\n', ':3: malformed CSV'),
    (f'1,{A}\n2,{B}"x\n', ':3: image id'),
    (f'1,{A}\nx7,{B}\n', ":3: landmark_id 'x7' is not a non-negative integer"),
    (f'1,{A}\n-2,{B}\n', ":3: landmark_id '-2' is not a non-negative integer"),
    (f'1,{A} {B[:15]}\n', f":2: image id '{B[:15]}' is not 16 lowercase hex digits"),
    (f'1,{A.upper()}\n', ':2: image id'),
    (f'1,{A}  {B}\n', ':2: empty image id'),
    ('1,\n', ':2: landmark 1 lists no images'),
  ],
)
def test_train_clean_faults(tmp_path, body, expected):
  path = _write(tmp_path, 'train_clean.csv', 'landmark_id,images\n' + body)
  with pytest.raises(csv_metadata.MetadataError) as e:
    csv_metadata.read_train_clean(path)
  assert str(e.value).startswith(path + ':'), str(e.value)
  assert expected in str(e.value)


def test_encoding_fault_names_line_and_byte(tmp_path):
  path = _write(
    tmp_path,
    'train.csv',
    f'id,url,landmark_id\n{A},http://x,1\n{B},http://\xe9t\xe9,2\n'.encode('latin-1'),
  )
  with pytest.raises(
    csv_metadata.MetadataError,
    match=r'train\.csv:3: not UTF-8 \(byte 0xe9 '
    r'at column 25\)',
  ):
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
  rc = prepare.main(['prepare', '--manual_dir', str(manual), '--data_dir', str(tmp_path / 'out')])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 1 and err[-1].startswith(f'error: {manual}/train_clean.csv:2: 3 fields')


def _gnd():
  return {
    'imlist': ['a', 'b', 'c'],
    'qimlist': ['q'],
    'gnd': [{'bbx': [0.0, 1.0, 5.0, 6.0], 'easy': [0], 'hard': [1], 'junk': []}],
  }


@pytest.mark.parametrize(
  'mutate, expected',
  [
    (lambda g: g['gnd'][0].update(easy=[3]), 'gnd[0].easy holds 3, not an index into the 3'),
    (lambda g: g['gnd'][0].update(bbx=[1, 2]), 'gnd[0].bbx [1, 2] is not 4 numbers'),
    (lambda g: g.update(imlist=['a', None, 'c']), 'imlist[1] is None'),
    (lambda g: g['gnd'].append(g['gnd'][0]), '2 gnd entries but 1 queries'),
  ],
)
def test_gnd_faults(tmp_path, mutate, expected):
  g = _gnd()
  mutate(g)
  path = _write(tmp_path, 'gnd_roxford5k.pkl', pickle.dumps(g))
  with pytest.raises(csv_metadata.MetadataError) as e:
    revisitop.read_gnd_file(path)
  assert str(e.value).startswith(path) and expected in str(e.value)


def test_gnd_truncated_pickle(tmp_path):
  data = pickle.dumps(_gnd())
  path = _write(tmp_path, 'gnd_rparis6k.pkl', data[: len(data) // 2])
  with pytest.raises(csv_metadata.MetadataError, match='not a readable ground-truth pickle'):
    revisitop.read_gnd_file(path)
  assert revisitop.read_gnd_file(_write(tmp_path, 'ok.pkl', pickle.dumps(_gnd())))['imlist']


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  from tests.helpers import train_testlib as tl

  return tl.ensure_fixture()


def test_verify_finds_damaged_array_record(prepared, tmp_path, capsys):
  data_dir = str(tmp_path / 'data')
  shutil.copytree(prepared, data_dir)
  assert prepare.main(['prepare', '--verify', '--data_dir', data_dir]) == 0
  assert 'all readable' in capsys.readouterr().out
  builder = gldv2.builder('gldv2/clean', data_dir)
  path = os.path.join(os.fspath(builder.data_path), 'gldv2-train.array_record-00000-of-00001')
  size = os.path.getsize(path)
  with open(path, 'r+b') as f:  # zero a block in the middle of the file
    f.seek(size // 2)
    f.write(b'\0' * 64)
  assert prepare.main(['prepare', '--verify', '--data_dir', data_dir]) == 1
  out, err = capsys.readouterr()
  assert f'DAMAGED {path}: ' in out and 'Corrupted Riegeli' in out
  assert 'validation' not in out  # the intact file is not reported
  assert '1 of 2 files' in err
  # A read during training names the file and the command.
  source = record_check.NamedSource(builder.as_data_source()['train'], 'gldv2/clean', data_dir)
  with pytest.raises(record_check.DamagedRecordError) as e:
    for i in range(len(source)):
      source[i]
  assert path in str(e.value) and 'python -m dolg_jax.data.prepare --verify' in str(e.value)


# ------------------------------------------------------------------------ datasets not prepared
def test_eval_names_unprepared_datasets_and_the_command(tmp_path):
  """An evaluation over datasets not prepared under eval.data_dir stops before loading the model,
  naming every missing dataset and the command that prepares them; prepared, it passes."""
  config = default.get_config()
  data_dir = str(tmp_path / 'tfds')
  config.eval.data_dir = data_dir
  config.eval.use_distractors = True
  with pytest.raises(revisitop.NotPreparedError) as e:
    evaluate.run(config, checkpoint=str(tmp_path / 'never_read.pyth'))
  assert str(e.value) == (
    f'roxford5k, rparis6k, revisitop1m are not prepared under {data_dir}: prepare each with '
    f'`python -m dolg_jax.data.prepare --dataset=NAME --manual_dir=M --data_dir={data_dir}`, M '
    'holding its revisitop files (roxford5k: jpg/, gnd_roxford5k.pkl; rparis6k: jpg/, '
    'gnd_rparis6k.pkl; revisitop1m: revisitop1m.txt, jpg/; github.com/filipradenovic/revisitop) '
    '(or set --config.eval.data_dir to the TFDS data dir holding them)'
  )
  # The command it names works, and then only the others are reported.
  manual = str(tmp_path / 'manual')
  fx.write_gnd_fixture(manual, 'rparis6k', num_landmarks=1)
  assert (
    prepare.main(
      ['prepare', '--dataset=rparis6k', f'--manual_dir={manual}', f'--data_dir={data_dir}']
    )
    == 0
  )
  assert prepare.main(['prepare', '--verify', '--dataset=rparis6k', f'--data_dir={data_dir}']) == 0
  config.eval.use_distractors = False
  with pytest.raises(revisitop.NotPreparedError) as e:
    evaluate.check_datasets(config)
  assert str(e.value).startswith(
    f'roxford5k is not prepared under {data_dir}: prepare it with `python -m '
    f'dolg_jax.data.prepare --dataset=roxford5k --manual_dir=M --data_dir={data_dir}`, M holding '
    'its revisitop files (jpg/, gnd_roxford5k.pkl; github.com/filipradenovic/revisitop)'
  )
  config.eval.datasets = ('rparis6k',)
  evaluate.check_datasets(config)
  assert revisitop.load_gnd('rparis6k', data_dir)['qimlist'] == ['query_lm0_0']


def test_training_checks_eval_datasets_before_writing(tmp_path):
  """With retrieval evaluation during training, unprepared eval datasets stop the run at its start
  (not hours in, at the first evaluation), before the workdir is written; the closing line is
  whole."""
  config = tiny.get_config()
  config.train.eval_retrieval, config.train.eval_every_steps = True, 2
  config.eval.data_dir = str(tmp_path / 'tfds')
  workdir = str(tmp_path / 'w')
  with pytest.raises(revisitop.NotPreparedError) as e:
    loop.train_and_evaluate(config, workdir)
  line = failures.describe(e.value, workdir)
  assert line.startswith('FAILED: roxford5k, rparis6k are not prepared under ')
  assert line.endswith('(or set --config.eval.data_dir to the TFDS data dir holding them)'), line
  assert not os.path.exists(workdir)


def test_gldv2_retrieval_not_prepared_names_the_command(tmp_path):
  data_dir = str(tmp_path / 'tfds')
  for read in (
    lambda: gldv2_retrieval.data_source(data_dir, 'test'),
    lambda: gldv2_retrieval.load_solution(data_dir),
  ):
    with pytest.raises(gldv2_retrieval.NotPreparedError) as e:
      read()
    assert str(e.value) == (
      f'gldv2_retrieval is not prepared under {data_dir}: prepare with `python -m '
      f'dolg_jax.data.prepare --dataset=gldv2_retrieval --manual_dir=M --data_dir={data_dir}` '
      'with M holding the official index.csv, test.csv, retrieval_solution_v2.1.csv and the '
      'index/ and test/ images_NNN.tar (github.com/cvdfoundation/google-landmark)'
    )


# ------------------------------------------------- GLDv2 retrieval metadata and exclusion lists
def test_retrieval_metadata_parses(tmp_path):
  index = _write(tmp_path, 'index.csv', f'id\n{A}\n{B}\n')
  assert gldv2_retrieval.read_ids(index) == [A, B]
  solution = _write(
    tmp_path,
    'retrieval_solution_v2.1.csv',
    f'id,images,Usage\n{C},{A} {B},Public\n{D},{B},Private\n{E},None,Ignored\n',
  )
  assert gldv2_retrieval.read_solution(solution) == ({C: [A, B]}, {D: [B]}, [E])
  excl = _write(tmp_path, 'exclude.csv', f'landmark_id,id\n7,\n, {A}\n')
  exclusion = gldv2.read_exclusion(excl)
  assert (exclusion.class_keys, exclusion.image_ids) == (frozenset({7}), frozenset({A}))


@pytest.mark.parametrize(
  'name, text, expected',
  [
    ('index.csv', f'id\n{A}\n{A},{B}\n', ':3: 2 fields, the header has 1'),
    ('index.csv', f'id\n{A}\n"{B}\n', ':3: malformed CSV'),
    ('index.csv', f'id\n{A}\n{B}"\n', f":3: image id '{B}\"' is not 16 lowercase hex digits"),
    ('index.csv', f'id\n{A}\n{B}\n{A}\n', f':4: image id {A} is listed again (first at line 2)'),
    (
      'index.csv',
      b'id\n' + A.encode() + b'\n\xff' + B[1:].encode() + b'\n',
      ':3: not UTF-8 (byte 0xff at column 1)',
    ),
    (
      'retrieval_solution_v2.1.csv',
      f'id,images,Usage\n{C},{A},{B},Public\n',
      ':2: 4 fields, the header has 3 (a comma where a space belongs?',
    ),
    ('retrieval_solution_v2.1.csv', f'id,images,Usage\n{C},"{A} {B},Public\n', ':2: malformed CSV'),
    (
      'retrieval_solution_v2.1.csv',
      f'id,images,Usage\n{C},{A}  {B},Public\n',
      ':2: empty image id',
    ),
    (
      'retrieval_solution_v2.1.csv',
      f'id,images,Usage\n{C},{A},Public\n{C},{B},Private\n',
      f':3: test id {C} is listed again (first at line 2)',
    ),
    (
      'retrieval_solution_v2.1.csv',
      f'id,images,Usage\n{C},,Private\n',
      f':2: Private test id {C} lists no images',
    ),
    (
      'retrieval_solution_v2.1.csv',
      f'id,images,Usage\n{C},{A},Public\n{D},{B},Privé\n'.encode('latin-1'),
      ':3: not UTF-8 (byte 0xe9 at column 39)',
    ),
    (
      'exclude.csv',
      'landmark_id,id\n7,x1\n',
      ":2: image id 'x1' is not 16 lowercase hex digits; fix the exclusion list exclude.csv",
    ),
    ('exclude.csv', 'landmark_id\n7\n"8\n', ':3: malformed CSV'),
    (
      'exclude.csv',
      b'landmark_id\n7\n\xe98\n',
      ':3: not UTF-8 (byte 0xe9 at column 1); the file is damaged or was re-encoded: fix the '
      'exclusion list exclude.csv',
    ),
  ],
)
def test_retrieval_and_exclusion_faults(tmp_path, name, text, expected):
  """Comma, quote, encoding and id faults in index.csv, the solution file and exclusion lists are
  named with file and line, through the readers the builders use."""
  path = _write(tmp_path, name, text)
  read = {
    'index.csv': gldv2_retrieval.read_ids,
    'exclude.csv': gldv2.read_exclusion,
    'retrieval_solution_v2.1.csv': gldv2_retrieval.read_solution,
  }[name]
  with pytest.raises(csv_metadata.MetadataError) as e:
    read(path)
  assert str(e.value).startswith(path + ':') and expected in str(e.value), str(e.value)


def test_prepare_retrieval_reports_solution_fault(tmp_path, capsys):
  manual = tmp_path / 'manual'
  manual.mkdir()
  (manual / 'retrieval_solution_v2.1.csv').write_text(f'id,images,Usage\n{C},{A},{B},Public\n')
  rc = prepare.main(
    [
      'prepare',
      '--dataset=gldv2_retrieval',
      '--manual_dir',
      str(manual),
      '--data_dir',
      str(tmp_path / 'out'),
    ]
  )
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 1 and err[-1].startswith(
    f'error: {manual}/retrieval_solution_v2.1.csv:2: 4 fields, the header has 3'
  ), err


def test_r1m_list_encoding_fault(tmp_path):
  path = _write(tmp_path, 'revisitop1m.txt', b'a/1.jpg\nb/2.jpg\nc/\xe93.jpg\n')
  with pytest.raises(
    csv_metadata.MetadataError,
    match=r'revisitop1m\.txt:3: not UTF-8 \(byte '
    r'0xe9 at column 3\)',
  ):
    revisitop.read_r1m_list(path)
