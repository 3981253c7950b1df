"""python -m dolg_jax.index on a folder of small images with the tiny model (subprocesses).

- a folder with nested dirs, mixed-case extensions, PNG / TIFF / BMP, a text file named .jpg and a
  truncated JPEG: the bad files are listed in skipped.csv with their reason, found = indexed +
  skipped, files without an image extension and hidden files are not found;
- descriptors equal evaluation's extraction of the same files (the same Extractor and protocol);
- the exact FAISS structure equals brute force;
- kill -9 half-way through a part, then the same command: the index equals an uninterrupted run's
  bit for bit (parts, plans, skipped.csv, faiss.index);
- images added later are appended (only they are extracted; earlier parts untouched);
- a changed model is refused with a named error, and --replace builds a new index; so is an index
  whose long-side cap differs (or is not recorded), with nothing written;
- two processes (jax.distributed on 127.0.0.1): each reads only the files of its own parts, and the
  merged index equals the one-process index bit for bit;
- damage: bytes overwritten in faiss.index, a deleted part, a truncated part, a damaged manifest and
  a part overwritten in place are named by search; the same index command repairs the first three
  to the undamaged index's bytes (and results).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import faiss
import numpy as np
import pytest

from dolg_jax.collection import store as store_lib
from tests.helpers import collection_testlib as ct
from tests.helpers.paths import REPO

WRAPPER = textwrap.dedent('''
    """dolg_jax.index with test hooks: KILL_AFTER_PARTS=n kills the process (SIGKILL) half-way
    through writing its (n+1)-th part; READ_LOG=path records every file this process reads."""
    import os, signal, sys
    import numpy as np
    sys.path.insert(0, {repo!r})
    from dolg_jax.collection import build, store
    kill_after = os.environ.get('KILL_AFTER_PARTS')
    if kill_after is not None:
      written = [0]
      original = store.IndexStore.write_part
      def write_part(self, gen, part, desc, rows, skipped):
        if written[0] == int(kill_after):
          os.makedirs(self.parts_dir, exist_ok=True)
          np.save(self.part_base(gen, part) + '.npy', desc)   # the descriptors, not the commit
          os.kill(os.getpid(), signal.SIGKILL)
        original(self, gen, part, desc, rows, skipped)
        written[0] += 1
      store.IndexStore.write_part = write_part
    log = os.environ.get('READ_LOG')
    if log:
      read = build.read_image
      def logged(root, rel, *args):
        with open(log, 'a') as f:
          f.write(rel + '\\n')
        return read(root, rel, *args)
      build.read_image = logged
    from dolg_jax import index
    sys.argv = ['dolg_jax.index'] + sys.argv[1:]
    index.run()
''')


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp('collection_index')
  wrapper = root / 'wrapped_index.py'
  wrapper.write_text(WRAPPER.format(repo=REPO))
  return {
    'root': root,
    'folder': ct.write_folder(str(root / 'images')),
    'ckpt': ct.write_checkpoint(str(root / 'tiny_a'), 0),
    'ckpt_b': ct.write_checkpoint(str(root / 'tiny_b'), 1),
    'xla': str(root / 'xla'),
    'wrapper': str(wrapper),
  }


def _index(env, out, *extra, images=None, ckpt=None, wrapped=False, extra_env=None):
  program = (env['wrapper'],) if wrapped else ('-m', 'dolg_jax.index')
  cmd = ct.index_cmd(
    ckpt or env['ckpt'], images or env['folder'], out, env['xla'], *extra, program=program
  )
  return ct.run(cmd, extra_env=extra_env)


@pytest.fixture(scope='module')
def clean(env):
  out = str(env['root'] / 'clean')
  proc = _index(env, out)
  assert proc.returncode == 0, ct.explain(proc)
  return out, proc


def _manifest(out):
  with open(os.path.join(out, 'manifest.json')) as f:
    return json.load(f)


def test_folder_counts_skipped_and_manifest(env, clean):
  out, proc = clean
  m = _manifest(out)
  n_good, n_bad = len(ct.IMAGES), len(ct.BAD)
  assert m['status'] == 'complete'
  assert m['counts'] == {
    'found': n_good + n_bad,
    'indexed': n_good,
    'skipped': n_bad,
    'parts': 5,
    'generations': 1,
  }
  assert f'found {n_good + n_bad} files = {n_good} indexed + {n_bad} skipped' in proc.stdout
  assert 'images/s' in proc.stderr and 'ETA' in proc.stderr  # the progress line
  skipped = {r['path']: r['reason'] for r in store_lib.IndexStore(out).read_skipped()}
  assert set(skipped) == set(ct.BAD)
  assert 'not a decodable image' in skipped['a/not_an_image.jpg']
  assert 'truncated' in skipped['b/truncated.JPG']
  rows = store_lib.Rows(store_lib.IndexStore(out))
  assert rows.paths == sorted(p for p, _ in ct.IMAGES)  # nested, any case, PNG/TIFF/BMP, sorted
  assert rows.all_descriptors().shape == (n_good, 16)
  np.testing.assert_allclose(np.linalg.norm(rows.all_descriptors(), axis=1), 1.0, atol=1e-5)
  assert all(len(r['sha1']) == 40 and int(r['height']) >= 65 for r in rows.meta)
  fp = m['fingerprint']
  assert fp['extraction']['scales'] == [1.0] and fp['descriptor_dtype'] == 'float32'
  assert m['model']['source'].startswith('released:')
  assert m['versions']['faiss-cpu'] and m['versions']['jax']
  assert m['faiss']['type'] == 'IndexFlatIP' and m['faiss']['recall']['recall'] == 1.0


def test_descriptors_equal_evaluation_extraction(env, clean):
  from configs import tiny
  from dolg_jax.data import decode
  from dolg_jax.retrieval import evaluate, extract

  out, _ = clean
  cfg = tiny.get_config()
  cfg.eval.scales = (1.0,)
  apply_fn, variables, _ = evaluate.load_model(cfg, checkpoint=env['ckpt'])
  rows = store_lib.Rows(store_lib.IndexStore(out))
  examples = []
  for i, p in enumerate(rows.paths):
    with open(os.path.join(env['folder'], p), 'rb') as f:
      examples.append({'index': i, 'image': decode.decode_rgb(f.read())})
  want = extract.Extractor(apply_fn, variables, extract.from_config(cfg.eval)).extract(
    examples, len(examples)
  )
  np.testing.assert_allclose(rows.all_descriptors(), want, atol=1e-6)


def test_exact_faiss_equals_brute_force(clean):
  from dolg_jax.collection import faiss_index, query

  out, _ = clean
  rows = store_lib.Rows(store_lib.IndexStore(out))
  x = rows.all_descriptors()
  index = faiss.read_index(os.path.join(out, 'faiss.index'))
  assert index.ntotal == x.shape[0]
  np.testing.assert_array_equal(faiss_index.flat_vectors(index), x)
  q = x[::3] + 0.01
  brute = q @ x.T
  order = np.argsort(-brute, axis=1, kind='stable')
  s, i = index.search(q, x.shape[0])  # FAISS's own exact search
  np.testing.assert_array_equal(i, order)
  np.testing.assert_allclose(s, np.take_along_axis(brute, order, 1), atol=1e-6)
  col = query.Collection(out)
  s2, i2 = col.search_descriptors(q, k=5)
  np.testing.assert_array_equal(i2, order[:, :5])
  np.testing.assert_allclose(s2, np.take_along_axis(brute, order[:, :5], 1), atol=1e-6)


def test_kill9_mid_index_then_resume_equals_a_clean_run(env, clean):
  out = str(env['root'] / 'killed')
  proc = _index(env, out, wrapped=True, extra_env={'KILL_AFTER_PARTS': '2'})
  assert proc.returncode == -9, ct.explain(proc)
  store = store_lib.IndexStore(out)
  assert store.committed_parts() == [(0, 0), (0, 1)]  # two whole parts ...
  assert os.path.exists(store.part_base(0, 2) + '.npy')  # ... and a partial third
  assert _manifest(out)['status'] == 'building'
  proc = _index(env, out)
  assert proc.returncode == 0, ct.explain(proc)
  found = sorted([p for p, _ in ct.IMAGES] + list(ct.BAD))
  good = {p for p, _ in ct.IMAGES}
  assert _manifest(out)['last_run']['extracted_by_process_0'] == len(good.intersection(found[6:]))
  assert ct.index_files(out) == ct.index_files(clean[0])  # bit for bit
  assert _manifest(out)['counts'] == _manifest(clean[0])['counts']


def test_images_added_later_are_appended(env, clean):
  folder = str(env['root'] / 'growing')
  shutil.copytree(env['folder'], folder)
  out = str(env['root'] / 'growing_index')
  assert _index(env, out, images=folder).returncode == 0
  before = ct.index_files(out)
  ct.add_later(folder)
  proc = _index(env, out, images=folder)
  assert proc.returncode == 0, ct.explain(proc)
  m = _manifest(out)
  assert m['last_run']['new'] == len(ct.LATER)
  assert m['last_run']['extracted_by_process_0'] == len(ct.LATER)  # nothing else re-extracted
  assert m['counts']['found'] == len(ct.IMAGES) + len(ct.BAD) + len(ct.LATER)
  assert m['counts']['generations'] == 2
  assert m['faiss']['extended_from'] == len(ct.IMAGES)
  after = ct.index_files(out)
  assert all(after[k] == v for k, v in before.items() if k.startswith(('parts/', 'plans/')))
  rows = store_lib.Rows(store_lib.IndexStore(out))
  assert rows.paths == sorted(p for p, _ in ct.IMAGES) + sorted(p for p, _ in ct.LATER)
  np.testing.assert_array_equal(
    rows.all_descriptors()[: len(ct.IMAGES)],
    store_lib.Rows(store_lib.IndexStore(clean[0])).all_descriptors(),
  )
  assert faiss.read_index(os.path.join(out, 'faiss.index')).ntotal == len(rows)


def test_changed_model_is_refused_and_replace_builds_anew(env, clean):
  out = str(env['root'] / 'changed')
  shutil.copytree(clean[0], out)
  before = ct.index_files(out)
  proc = _index(env, out, ckpt=env['ckpt_b'])
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('FAILED:') and 'built with another model_key' in last, last
  assert '--replace' in last
  assert ct.index_files(out) == before  # nothing mixed in
  proc = _index(env, out, '--replace', ckpt=env['ckpt_b'])
  assert proc.returncode == 0, ct.explain(proc)
  new_key = _manifest(out)['fingerprint']['model_key']
  assert new_key != _manifest(clean[0])['fingerprint']['model_key']
  aside = [n for n in os.listdir(env['root']) if n.startswith('changed.replaced-')]
  assert len(aside) == 1
  assert ct.index_files(os.path.join(env['root'], aside[0])) == before


def _config_and_options():
  """The config and options `clean` was built with (the index command's, in-process)."""
  from configs import tiny

  cfg = tiny.get_config()
  cfg.eval.scales = (1.0,)
  return cfg, ct.options()


def test_changed_protocol_is_refused(env, clean):
  from dolg_jax.collection import build

  cfg, opts = _config_and_options()
  cfg.eval.max_side = 80  # another protocol
  with pytest.raises(store_lib.IndexMismatchError, match='extraction.max_side'):
    build.build(cfg, checkpoint=env['ckpt'], images=env['folder'], out=clean[0], options=opts)


def _tree(out):
  """{relative path: bytes} of every file under an index directory (the manifest included)."""
  files = {}
  for folder, _, names in os.walk(out):
    for name in names:
      with open(os.path.join(folder, name), 'rb') as f:
        files[os.path.relpath(os.path.join(folder, name), out)] = f.read()
  return files


@pytest.mark.parametrize('recorded', ['another', 'none'])
def test_changed_long_side_cap_is_refused_and_nothing_is_written(env, clean, recorded):
  """An index whose descriptors were capped otherwise (a recorded cap this version does not apply,
  or none recorded: an index from before caps, max_side 0) is never appended to or searched."""
  from dolg_jax.collection import build, query

  out = _damaged_copy(env, clean, f'cap_{recorded}')
  m = _manifest(out)
  cap = m['protocol']['long_side_cap']
  assert cap == 8192  # scale 1.0: the largest side
  if recorded == 'another':
    m['protocol']['long_side_cap'] = cap - 1
  else:
    del m['protocol']['long_side_cap']
  store_lib.IndexStore(out).write_manifest(m)
  before = _tree(out)
  cfg, opts = _config_and_options()
  with pytest.raises(store_lib.IndexMismatchError, match=r'protocol\.long_side_cap.*--replace'):
    build.build(cfg, checkpoint=env['ckpt'], images=env['folder'], out=out, options=opts)
  assert _tree(out) == before  # nothing written, the manifest included
  col = query.Collection(out)  # the stored descriptors can still be searched by descriptor ...
  with pytest.raises(store_lib.IndexMismatchError, match=r'protocol\.long_side_cap.*--replace'):
    col.extractor()  # ... but never by query images described another way
  assert _tree(out) == before


def test_long_side_cap_of_an_index_from_before_caps():
  fp = {'extraction': {'max_side': 1024}}
  assert store_lib.long_side_cap_problem({'protocol': {'long_side_cap': 1024}}, 1024) is None
  assert 'long_side_cap=1000' in store_lib.long_side_cap_problem(
    {'protocol': {'long_side_cap': 1000}, 'fingerprint': fp}, 1024
  )
  # no cap recorded: the code of that time capped at max_side alone
  assert store_lib.long_side_cap_problem({'protocol': {}, 'fingerprint': fp}, 1024) is None
  for max_side, cap in ((1024, 1000), (0, 5793)):  # max_side above the cap, or none: unknown
    got = store_lib.long_side_cap_problem(
      {'fingerprint': {'extraction': {'max_side': max_side}}}, cap
    )
    assert 'records no protocol.long_side_cap' in got and f'max_side={max_side}' in got


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_each_read_their_share_and_equal_one(env, clean):
  out = str(env['root'] / 'two')
  address = f'127.0.0.1:{_free_port()}'
  logs = [str(env['root'] / f'reads_{i}.txt') for i in range(2)]
  procs = []
  for i in range(2):
    cmd = ct.index_cmd(
      env['ckpt'],
      env['folder'],
      out,
      env['xla'],
      f'--coordinator_address={address}',
      '--num_processes=2',
      f'--process_id={i}',
      program=(env['wrapper'],),
    )
    procs.append(
      subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(ct.env(), READ_LOG=logs[i]),
      )
    )
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=300)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, o in zip(procs, outputs):
    assert p.returncode == 0, o[-5000:]
  plan = store_lib.IndexStore(out).plans()[0]
  parts = store_lib.IndexStore.plan_parts(plan)
  reads = [open(log).read().split() for log in logs]
  for i in range(2):  # process i read exactly the files of parts i, i + 2, ...
    assert sorted(reads[i]) == sorted(f for _, c, fs in parts if c % 2 == i for f in fs)
  assert ct.index_files(out) == ct.index_files(clean[0])
  assert _manifest(out)['counts'] == _manifest(clean[0])['counts']
  assert _manifest(out)['last_run']['processes'] == 2


def test_list_file_and_folder_listing(tmp_path):
  from dolg_jax.collection import files

  root = ct.write_folder(str(tmp_path / 'images'))
  lst = tmp_path / 'images' / 'list.txt'
  lst.write_text('# my picks\na/img04.jpeg\n\n./img00.jpg\na/img04.jpeg\nc/../c/img10.tif\n')
  assert files.list_images(str(lst)) == (root, ['a/img04.jpeg', 'c/img10.tif', 'img00.jpg'])
  got_root, found = files.list_images(root)
  assert got_root == root
  assert found == sorted([p for p, _ in ct.IMAGES] + list(ct.BAD))  # no .txt, no hidden file
  with pytest.raises(FileNotFoundError, match='neither a folder nor a list file'):
    files.list_images(str(tmp_path / 'nope'))


def test_rows_take_across_parts(tmp_path):
  store = store_lib.IndexStore(str(tmp_path / 'idx'))
  rng = np.random.default_rng(0)
  parts = [rng.standard_normal((n, 4)).astype(np.float16) for n in (3, 0, 5, 2)]
  for c, d in enumerate(parts):
    rows = [
      {'path': f'p{c}_{i}', 'height': 1, 'width': 1, 'bytes': 1, 'sha1': 'x'} for i in range(len(d))
    ]
    store.write_part(0, c, d if len(d) else np.zeros((0, 0), np.float16), rows, [])
  r = store_lib.Rows(store)
  x = np.concatenate(parts).astype(np.float32)
  ids = np.array([[9, 0, 4], [3, 3, 8]])
  np.testing.assert_array_equal(r.take(ids), x[ids])
  assert r.paths[3] == 'p2_0' and len(r) == 10


def _damaged_copy(env, clean, name):
  out = str(env['root'] / name)
  shutil.copytree(clean[0], out)
  return out


def _overwrite(path, offset, data):
  with open(path, 'r+b') as f:
    f.seek(offset)
    f.write(data)


def test_damaged_search_structure_is_named_and_rebuilt(env, clean):
  from dolg_jax.collection import query

  out = _damaged_copy(env, clean, 'damaged_faiss')
  path = os.path.join(out, 'faiss.index')
  _overwrite(path, os.path.getsize(path) // 2, b'\xff' * 16)  # NaNs inside the vectors
  with pytest.raises(store_lib.DamagedIndexError, match=r'faiss.index is damaged.*dolg_jax.index'):
    query.Collection(out)
  proc = _index(env, out)
  assert proc.returncode == 0, ct.explain(proc)
  assert 'repairing' in proc.stderr and 'faiss.index' in proc.stderr
  assert ct.index_files(out) == ct.index_files(clean[0])
  q = store_lib.Rows(store_lib.IndexStore(clean[0])).all_descriptors()[::2] + 0.01
  got, want = (
    query.Collection(out).search_descriptors(q, k=5),
    query.Collection(clean[0]).search_descriptors(q, k=5),
  )
  np.testing.assert_array_equal(got[1], want[1])
  np.testing.assert_array_equal(got[0], want[0])
  assert np.isfinite(got[0]).all()


def test_deleted_and_truncated_parts_are_named_and_extracted_again(env, clean):
  from dolg_jax.collection import query

  out = _damaged_copy(env, clean, 'damaged_parts')
  store = store_lib.IndexStore(out)
  for rel in store.part_files(0, 1):  # a part deleted
    os.remove(os.path.join(out, rel))
  npy = store.part_base(0, 3) + '.npy'  # a part truncated
  with open(npy, 'r+b') as f:
    f.truncate(os.path.getsize(npy) // 2)
  with pytest.raises(store_lib.DamagedIndexError, match=r'g00000-p000001\.\S+ is missing'):
    query.Collection(out)
  with pytest.raises(store_lib.DamagedIndexError, match=r'g00000-p000001\.csv is missing'):
    store_lib.Rows(store, parts=[(0, 0), (0, 1)])  # the row table's own check of the parts asked
  proc = _index(env, out)
  assert proc.returncode == 0, ct.explain(proc)
  assert 'p000003.npy differs from its checksum' in proc.stderr
  m = _manifest(out)
  parts = store_lib.IndexStore.plan_parts(store.plans()[0])
  good = {p for p, _ in ct.IMAGES}
  redone = [f for _, c, fs in parts if c in (1, 3) for f in fs if f in good]
  assert m['last_run']['extracted_by_process_0'] == len(redone)  # those two parts' images only
  assert ct.index_files(out) == ct.index_files(clean[0])  # byte for byte
  assert m['checksums'] == _manifest(clean[0])['checksums']


def test_overwritten_part_and_manifest_are_named_never_nan(env, clean):
  from dolg_jax.collection import query

  out = _damaged_copy(env, clean, 'damaged_in_place')
  npy = store_lib.IndexStore(out).part_base(0, 0) + '.npy'
  _overwrite(npy, os.path.getsize(npy) - 16, b'\xff' * 16)  # same size: NaN descriptors
  col = query.Collection(out)  # sizes fine: opens
  q = store_lib.Rows(store_lib.IndexStore(clean[0])).all_descriptors()[:2]
  with pytest.raises(store_lib.DamagedIndexError, match='not finite'):
    col.search_descriptors(q, k=5, rerank='superglobal')  # never a NaN score
  with open(os.path.join(out, 'manifest.json'), 'r+b') as f:  # a truncated manifest
    f.truncate(100)
  proc = ct.run(
    [
      sys.executable,
      '-m',
      'dolg_jax.search',
      f'--index={out}',
      f'--query={os.path.join(env["folder"], "img00.jpg")}',
    ]
  )
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('FAILED:') and os.path.join(out, 'manifest.json') in last, last
  assert 'not valid JSON' in last and 'unexpected' not in last


def test_ivfpq_rebuilt_from_its_record_equals_the_extended_structure():
  from dolg_jax.collection import faiss_index

  rng = np.random.default_rng(0)
  x = rng.standard_normal((3000, 32)).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)

  def blocks(a, b):
    return lambda: ((s, x[s : s + 500]) for s in range(a, b, 500))

  def take(ids):
    return x[ids]

  spec = faiss_index.Spec(kind='ivfpq', nlist=16)
  first, resolved, info = faiss_index.build(blocks(0, 2000), take, 2000, 32, spec)
  faiss_index.extend(first, blocks(2000, 3000)())  # images added later
  again, _, _ = faiss_index.build(
    blocks(0, 3000), take, 3000, 32, spec, resolved=resolved, trained_rows=info['trained_rows']
  )
  assert info['trained_rows'] == 2000
  np.testing.assert_array_equal(faiss.serialize_index(again), faiss.serialize_index(first))
