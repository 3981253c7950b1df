"""Verified checkpoints (dolg_jax.training.checkpointing), in-process on a small state.

Injects the real faults into saved steps: single bit flips and truncation of the array files,
damaged metadata and run records, a missing record; checks that the bad step is moved aside
(renamed, never deleted), the newest good step is restored, and that with no good step the error
lists what was found.
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dolg_jax import sharding as shd
from dolg_jax.training import checkpointing
from dolg_jax import checksums


def _mesh():
  return shd.make_mesh(ml_collections.ConfigDict({'data': -1, 'model': 1}))


def _state(seed):
  rng = np.random.default_rng(seed)
  return {
    'w': jnp.asarray(rng.normal(size=(256, 64)).astype(np.float32)),
    'b': jnp.asarray(rng.normal(size=(64,)).astype(np.float32)),
    'step': jnp.asarray(seed, jnp.int32),
  }


def _abstract(mesh):
  s = _state(0)
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shd.replicated(mesh)), s
  )


def _write(workdir, steps=(2, 4)):
  mesh = _mesh()
  manager = checkpointing.make_manager(workdir, keep=5, async_save=True)
  for step in steps:
    state = _state(step)
    it = {'next_step': step}
    checkpointing.save(
      manager, step, state, it, checkpointing.make_record(step, state, it, mesh, {'seed': 0})
    )
  checkpointing.finish(manager)
  manager.close()


def _restore(workdir):
  manager = checkpointing.make_manager(workdir, keep=5)
  try:
    return checkpointing.restore_verified(manager, _abstract(_mesh()), _mesh())
  finally:
    manager.close()


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('ckpt'))
  _write(workdir)
  return workdir


@pytest.fixture
def workdir(saved, tmp_path):
  import shutil

  dst = str(tmp_path / 'w')
  shutil.copytree(saved, dst)
  return dst


def _data_files(step_dir):
  out = []
  for root, _, files in os.walk(os.path.join(step_dir, 'state')):
    out += [
      os.path.join(root, f)
      for f in files
      if os.sep + 'd' + os.sep in os.path.join(root, f) and 'ocdbt.process' in root
    ]
  return sorted(out, key=os.path.getsize)


def _corrupt_dirs(workdir):
  return sorted(n for n in os.listdir(os.path.join(workdir, 'checkpoints')) if '.corrupt-' in n)


def test_clean_restore_is_the_newest_step(workdir):
  step, state, it, record = _restore(workdir)
  assert step == 4 and it == {'next_step': 4} and record['step'] == 4
  np.testing.assert_array_equal(np.asarray(state['w']), np.asarray(_state(4)['w']))


def test_digest_is_independent_of_sharding_and_matches_numpy():
  x = np.random.default_rng(1).normal(size=(8, 6)).astype(np.float32)
  d = checksums.tree_digests({'x': jnp.asarray(x)}, _mesh())["['x']"]
  assert d == checksums.numpy_digest(x)
  for i in range(0, 48 * 32, 97):  # every flipped bit changes the digest
    y = x.copy()
    y.reshape(-1).view(np.uint32)[i // 32] ^= np.uint32(1 << (i % 32))
    assert checksums.numpy_digest(y) != d


@pytest.mark.parametrize('fraction', [0.1, 0.35, 0.5, 0.8, 0.97])
def test_bit_flip_in_newest_step_falls_back(workdir, fraction, capsys):
  path = _data_files(os.path.join(workdir, 'checkpoints', '4'))[-1]  # the arrays' bytes
  with open(path, 'r+b') as f:
    f.seek(int(os.path.getsize(path) * fraction))
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0x10]))
  step, state, _, _ = _restore(workdir)
  assert step == 2
  np.testing.assert_array_equal(np.asarray(state['w']), np.asarray(_state(2)['w']))
  moved = _corrupt_dirs(workdir)
  assert moved == ['4.corrupt-checksum'], moved
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', moved[0], 'state'))  # kept, not deleted
  out = capsys.readouterr().out
  assert 'checkpoints/4' in out and 'moved to' in out
  assert 'Fell back to checkpoint step 2' in out.strip().splitlines()[-1]
  print(out)


def test_truncated_array_file(workdir, capsys):
  path = _data_files(os.path.join(workdir, 'checkpoints', '4'))[-1]
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)
  assert _restore(workdir)[0] == 2
  assert _corrupt_dirs(workdir)[0].startswith('4.corrupt-')


@pytest.mark.parametrize(
  'relpath, reason',
  [('state/_METADATA', 'unreadable'), ('record/process_0-of-1.json', 'unreadable-record')],
)
def test_damaged_metadata(workdir, relpath, reason, capsys):
  path = os.path.join(workdir, 'checkpoints', '4', relpath)
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 3)
  assert _restore(workdir)[0] == 2
  moved = _corrupt_dirs(workdir)
  assert len(moved) == 1 and moved[0].startswith(f'4.corrupt-{reason}'), moved
  out = capsys.readouterr().out
  assert os.path.join(workdir, 'checkpoints', '4') in out and 'moved to' in out
  print(out)


def test_iterator_state_tampered(workdir):
  path = os.path.join(workdir, 'checkpoints', '4', 'data_iter', 'process_0-of-1.json')
  with open(path, 'w') as f:
    json.dump({'next_step': 5}, f)
  assert _restore(workdir)[0] == 2
  assert _corrupt_dirs(workdir) == ['4.corrupt-checksum']


def test_no_step_verifies(workdir):
  for step in (2, 4):
    path = _data_files(os.path.join(workdir, 'checkpoints', str(step)))[-1]
    with open(path, 'r+b') as f:
      f.truncate(10)
  with pytest.raises(checkpointing.NoValidCheckpointError) as e:
    _restore(workdir)
  msg = str(e.value)
  assert 'no checkpoint in' in msg and '2 found' in msg and 'step 4:' in msg and 'step 2:' in msg
  assert len(_corrupt_dirs(workdir)) == 2
  # A rerun does not silently start from scratch over the damaged steps.
  with pytest.raises(checkpointing.NoValidCheckpointError, match='only checkpoints that failed'):
    _restore(workdir)


def test_shape_change_is_not_corruption(workdir):
  mesh = _mesh()
  abstract = _abstract(mesh)
  abstract['w'] = jax.ShapeDtypeStruct((128, 64), jnp.float32, sharding=shd.replicated(mesh))
  manager = checkpointing.make_manager(workdir, keep=5)
  with pytest.raises(
    checkpointing.IncompatibleCheckpointError, match=r"\['w'\]: saved \(256, 64\)"
  ):
    checkpointing.restore_verified(manager, abstract, mesh)
  manager.close()
  assert not _corrupt_dirs(workdir)
