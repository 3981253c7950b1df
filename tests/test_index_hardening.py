"""Real photo folders never stop an index: every file is indexed or skipped with a reason, resources
stay bounded, and the smaller input rules (list files, k, empty index, options, reasons).

Each case uses a real file of its kind made here: a 6000x4000 camera-size JPEG indexed with the
default protocol (three scales, no max_side) and found by a query of the same photo; a name that
is not UTF-8; a FIFO; a link to a character device; a 20000x20000 PNG of 49 kB (pixel bomb) with
the indexing process's peak RSS measured; list files with a BOM, spaces, a second encoding and one
file under two names. Damage and repair of an index: tests/test_index.py.
"""

import codecs
import functools
import json
import os
import sys

import cv2
import numpy as np
import pytest

from dolg_jax.collection import files
from dolg_jax.collection import reading
from dolg_jax.collection import store as store_lib
from tests.helpers import collection_testlib as ct

NON_UTF8 = os.fsdecode(b'caf\xe9 \xff.jpg')  # Latin-1 bytes: not UTF-8
SPACED = ' spaced name .jpg'
SECRET = 'password=hunter2 and more text'


PEAK_RSS_WRAPPER = (
  "import atexit, runpy, sys\n"
  "def peak():\n"
  "  status = open('/proc/self/status').read()\n"
  "  print('VmHWM_kB=' + status.split('VmHWM:')[1].split()[0], file=sys.stderr)\n"
  "atexit.register(peak)\n"
  "sys.argv[0] = 'dolg_jax.index'\n"
  "runpy.run_module('dolg_jax.index', run_name='__main__')\n"
)


def camera_photo(path: str) -> None:
  """A 6000x4000 JPEG (24 MP, the size of an ordinary camera photo)."""
  img = cv2.resize(ct.image(3), (6000, 4000), interpolation=cv2.INTER_LINEAR)
  cv2.imwrite(path, img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])


def _index_cmd(env, images, out, *extra, program=('-m', 'dolg_jax.index')):
  """The index command with the config's protocol (three scales), parts of 2, default readers."""
  return ct.index_cmd(
    env['ckpt'],
    images,
    out,
    env['xla'],
    *extra,
    program=program,
    part_size=2,
    read_workers=None,
    protocol=(),
  )


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp('hardening')
  folder = root / 'photos'
  folder.mkdir()
  for i in range(3):
    ct.save(str(folder / f'img{i}.jpg'), ct.image(i), 'JPEG', quality=95)
  camera_photo(str(folder / 'camera.jpg'))
  ct.save(os.path.join(str(folder), NON_UTF8), ct.image(7), 'PNG')
  ct.save(str(folder / SPACED), ct.image(8), 'PNG')
  os.mkfifo(folder / 'pipe.jpg')
  os.symlink('/dev/zero', folder / 'zero.jpg')
  (folder / 'secret.jpg').write_text(SECRET)
  return {
    'root': root,
    'folder': str(folder),
    'ckpt': ct.write_checkpoint(str(root / 'ckpt'), 0),
    'xla': str(root / 'xla'),
  }


@pytest.fixture(scope='module')
def odd_index(env):
  out = str(env['root'] / 'index')
  proc = ct.run(_index_cmd(env, env['folder'], out), 600)
  assert proc.returncode == 0, ct.explain(proc)
  return out, proc


def test_every_file_is_a_row_or_a_skip(env, odd_index):
  out, proc = odd_index
  with open(os.path.join(out, 'manifest.json')) as f:
    m = json.load(f)
  assert m['counts']['found'] == 9
  assert m['counts']['indexed'] == 6 and m['counts']['skipped'] == 3
  skipped = {r['path']: r['reason'] for r in store_lib.IndexStore(out).read_skipped()}
  assert set(skipped) == {'pipe.jpg', 'zero.jpg', 'secret.jpg'}
  assert 'FIFO' in skipped['pipe.jpg']  # skipped, not waited on
  assert 'character device' in skipped['zero.jpg']  # a link to a device: not read
  assert 'not a decodable image' in skipped['secret.jpg']
  assert 'hunter2' not in skipped['secret.jpg'] and 'password' not in skipped['secret.jpg']
  rows = store_lib.Rows(store_lib.IndexStore(out))
  assert sorted(rows.paths) == sorted(
    ['camera.jpg', 'img0.jpg', 'img1.jpg', 'img2.jpg', NON_UTF8, SPACED]
  )  # exact names
  camera = rows.meta[rows.paths.index('camera.jpg')]
  assert (int(camera['height']), int(camera['width'])) == (4000, 6000)
  assert m['protocol']['long_side_cap'] == 5793  # 5793 * 1.4142 rounds to 8192
  assert m['protocol']['max_pixels'] == reading.MAX_PIXELS
  with open(os.path.join(out, 'skipped.csv'), 'rb') as f:
    f.read().decode('utf-8')  # the tables are UTF-8 ...
  part_tables = b''.join(
    open(os.path.join(out, 'parts', n), 'rb').read()
    for n in os.listdir(os.path.join(out, 'parts'))
    if n.endswith('.csv')
  )
  assert b'caf\\xe9 \\xff.jpg' in part_tables  # ... with the bytes escaped


def test_camera_photo_and_non_utf8_name_are_found_by_themselves(env, odd_index):
  out, _ = odd_index
  res = str(env['root'] / 'search')
  queries = [os.path.join(env['folder'], 'camera.jpg'), os.path.join(env['folder'], NON_UTF8)]
  proc = ct.run(
    [
      sys.executable,
      '-m',
      'dolg_jax.search',
      f'--index={out}',
      *(f'--query={q}' for q in queries),
      '--k=3',
      f'--out={res}',
    ],
    600,
  )
  assert proc.returncode == 0, ct.explain(proc)
  with open(os.path.join(res, 'results.json')) as f:
    got = json.load(f)
  assert [q['query'] for q in got['queries']] == queries  # round-trips exactly
  top = [q['results'][0] for q in got['queries']]
  assert [t['path'] for t in top] == ['camera.jpg', NON_UTF8]
  assert all(t['score'] > 0.9999 for t in top)
  assert os.path.exists(os.path.join(env['folder'], top[1]['path']))  # the name opens the file
  assert 'caf\\xe9 \\xff.jpg' in proc.stdout  # printed escaped
  with open(os.path.join(res, 'report.html'), encoding='utf-8') as f:
    assert 'caf\\xe9 \\xff.jpg' in f.read()


def test_pixel_bomb_is_skipped_with_bounded_memory(env):
  folder = env['root'] / 'bomb'
  folder.mkdir()
  ct.save(str(folder / 'small.png'), ct.image(5), 'PNG')
  (folder / 'bomb.png').write_bytes(ct.png_bomb(20000))  # 400 MP; 1.2 GB decoded
  assert os.path.getsize(folder / 'bomb.png') < 100_000
  out = str(env['root'] / 'bomb_index')
  # The process's own high-water mark (VmHWM of its memory after exec; ru_maxrss would also
  # count the pytest process it was forked from), printed by the process as it exits.
  cmd = _index_cmd(
    env, str(folder), out, '--config.eval.scales=(1.0,)', program=('-c', PEAK_RSS_WRAPPER)
  )
  proc = ct.run(cmd, 300)
  assert proc.returncode == 0, ct.explain(proc)
  peak_mib = int(proc.stderr.rsplit('VmHWM_kB=', 1)[1].split()[0]) / 1024
  print(f'peak RSS of the indexing process with a 20000x20000 PNG: {peak_mib:.0f} MiB')
  assert peak_mib < 1000, peak_mib  # the decoded bomb alone is 1144 MiB
  skipped = store_lib.IndexStore(out).read_skipped()
  assert [r['path'] for r in skipped] == ['bomb.png']
  assert skipped[0]['reason'] == f'too many pixels: 400000000 > --max_pixels={reading.MAX_PIXELS}'


def test_reading_refuses_what_is_not_a_regular_file_and_too_large(tmp_path):
  got = reading.read_image('/dev/zero')
  assert got.reason == 'not a regular file: a character device'
  assert 'folder' in reading.read_image(str(tmp_path)).reason
  assert 'no such file' in reading.read_image(str(tmp_path / 'gone.jpg')).reason
  big = tmp_path / 'big.jpg'
  big.write_bytes(b'\xff\xd8' + b'\0' * (2 << 20))
  assert 'file too large' in reading.read_image(str(big), reading.Limits(max_file_mb=1)).reason
  small = tmp_path / 'small.png'
  ct.save(str(small), ct.image(1), 'PNG')
  assert 'too many pixels' in reading.read_image(str(small), reading.Limits(max_pixels=100)).reason
  assert reading.read_image(str(small)).image is not None


def test_list_files_exact_names_bom_duplicates_and_encoding(tmp_path):
  root = str(tmp_path)
  lst = tmp_path / 'list.txt'
  lst.write_bytes(
    codecs.BOM_UTF8
    + '\n'.join(
      [
        'a/x.jpg',
        f'{root}/a/x.jpg',
        './a/../a/x.jpg',  # one file, three spellings
        SPACED,
        '# a comment',
        '   ',
        'b/y.jpg\r',
        '/elsewhere/z.jpg',
        '../up.jpg',
      ]
    ).encode()
  )
  got_root, found = files.list_images(str(lst))
  assert got_root == root
  assert found == sorted(
    [
      'a/x.jpg',
      SPACED,
      'b/y.jpg',
      '/elsewhere/z.jpg',
      os.path.join(os.path.dirname(root), 'up.jpg'),
    ]
  )
  lst.write_bytes('a.jpg\nb.jpg\n'.encode() + 'café.jpg\n'.encode('latin-1'))
  with pytest.raises(files.ListFileError, match=r'list.txt, line 3: not UTF-8 .*save the list'):
    files.list_images(str(lst))


_options = functools.partial(ct.options, part_size=2, progress=False)


def _tiny_config():
  from configs import tiny

  cfg = tiny.get_config()
  cfg.eval.scales = (1.0,)
  cfg.eval.xla_cache_dir = ''
  return cfg


def test_device_in_a_list_file_and_an_empty_folder(env, tmp_path):
  from dolg_jax.collection import build, query

  lst = tmp_path / 'list.txt'
  ct.save(str(tmp_path / 'one.png'), ct.image(4), 'PNG')
  lst.write_text(f'one.png\n{tmp_path}/one.png\n/dev/zero\n')
  m = build.build(
    _tiny_config(),
    checkpoint=env['ckpt'],
    images=str(lst),
    out=str(tmp_path / 'listed'),
    options=_options(),
  )
  assert m['counts'] == {'found': 2, 'indexed': 1, 'skipped': 1, 'parts': 1, 'generations': 1}
  skipped = store_lib.IndexStore(str(tmp_path / 'listed')).read_skipped()
  assert skipped == [{'path': '/dev/zero', 'reason': 'not a regular file: a character device'}]

  (tmp_path / 'empty').mkdir()
  m = build.build(
    _tiny_config(),
    checkpoint=env['ckpt'],
    images=str(tmp_path / 'empty'),
    out=str(tmp_path / 'empty_index'),
    options=_options(),
  )
  assert m['status'] == 'complete' and m['counts']['found'] == 0 and m['faiss'] is None
  col = query.Collection(str(tmp_path / 'empty_index'))
  assert col.search_images([str(tmp_path / 'one.png')], k=5) == [[]]
  scores, ids = col.search_descriptors(np.ones((2, 16), np.float32) / 4, k=5)
  assert scores.shape == ids.shape == (2, 0)
  with pytest.raises(ValueError, match='k must be an integer >= 1'):
    col.search_descriptors(np.ones((1, 16), np.float32) / 4, k=0)


def test_bad_options_are_refused_before_anything_is_written(env, tmp_path):
  from dolg_jax.collection import build

  for bad, match in (
    (dict(part_size=0), '--part_size must be >= 1; got 0'),
    (dict(read_workers=-1), '--read_workers'),
    (dict(limits=reading.Limits(max_pixels=0)), '--max_pixels'),
  ):
    with pytest.raises(ValueError, match=match):
      build.build(
        _tiny_config(),
        checkpoint=env['ckpt'],
        images=env['folder'],
        out=str(tmp_path / 'never'),
        options=_options(**bad),
      )
    assert not os.path.exists(tmp_path / 'never')


def test_search_k_is_checked(env, odd_index):
  proc = ct.run(
    [
      sys.executable,
      '-m',
      'dolg_jax.search',
      f'--index={odd_index[0]}',
      f'--query={os.path.join(env["folder"], "img0.jpg")}',
      '--k=0',
    ],
    120,
  )
  assert proc.returncode == 1
  assert '--k must be >= 1; got 0' in proc.stderr
