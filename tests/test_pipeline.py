"""Tests of the grain pipelines: determinism, worker-count invariance, resume, sharding, eval."""

import io

import cv2
import grain
import ml_collections
import numpy as np
from PIL import Image
import pytest

from dolg_jax.data import decode
from dolg_jax.data import grain_pipeline as pipeline
from dolg_jax.data.synthetic import gldv2_fixture

N = 37  # Records in the synthetic source (label = record index, so batches identify records).


def _config(size=32):
  d = ml_collections.ConfigDict()
  d.image_size = size
  d.crop_scale = (0.25, 1.0)
  d.crop_ratio = (3 / 4, 4 / 3)
  d.random_flip = True
  d.decode = 'exact'
  d.augmentation = 'paper'
  d.lighting_std = 0.0
  d.num_workers = 0
  d.read_threads = 2
  d.prefetch_buffer_size = 2
  d.worker_buffer_size = 2
  c = ml_collections.ConfigDict()
  c.data = d
  return c


@pytest.fixture(scope='module')
def source():
  rng = np.random.default_rng(0)
  records = []
  for i in range(N):
    h, w = (int(x) for x in rng.integers(40, 90, size=2))
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, 'JPEG', quality=80)
    records.append({'image': buf.getvalue(), 'label': i})
  return records


def _batches(it, n):
  out = pipeline.first_batches(it, n)
  return out


def _equal(a, b):
  return len(a) == len(b) and all(
    x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
  )


def test_batches_shapes_epochs_and_seed(source):
  cfg = _config()
  it = pipeline.make_train_iterator(
    cfg, source, seed=1, process_index=0, process_count=1, per_host_batch=4
  )
  steps = pipeline.steps_per_epoch(N, process_count=1, per_host_batch=4)
  assert steps == 9
  batches = _batches(it, 2 * steps)
  assert batches[0]['image'].shape == (4, 32, 32, 3) and batches[0]['image'].dtype == np.uint8
  assert batches[0]['label'].dtype == np.int32
  epoch0 = np.concatenate([b['label'] for b in batches[:steps]])
  epoch1 = np.concatenate([b['label'] for b in batches[steps:]])
  assert len(set(epoch0)) == len(epoch0) == 36 and len(set(epoch1)) == 36  # No repeats per epoch.
  assert not np.array_equal(epoch0, epoch1)  # Reshuffled per epoch.
  again = _batches(
    pipeline.make_train_iterator(
      cfg, source, seed=1, process_index=0, process_count=1, per_host_batch=4
    ),
    3,
  )
  assert _equal(batches[:3], again)
  other = _batches(
    pipeline.make_train_iterator(
      cfg, source, seed=2, process_index=0, process_count=1, per_host_batch=4
    ),
    3,
  )
  assert not _equal(batches[:3], other)


def test_num_epochs_ends_iteration(source):
  it = pipeline.make_train_iterator(
    _config(), source, seed=0, process_index=0, process_count=1, per_host_batch=10, num_epochs=2
  )
  assert len(list(it)) == 2 * (N // 10)


def test_mid_epoch_resume_continues_with_the_next_batch(source):
  cfg = _config()
  kwargs = dict(seed=5, process_index=0, process_count=1, per_host_batch=4)
  straight = _batches(pipeline.make_train_iterator(cfg, source, **kwargs), 14)
  it = pipeline.make_train_iterator(cfg, source, **kwargs)
  _batches(it, 11)  # Into the second epoch (9 steps per epoch).
  state = it.get_state()
  fresh = pipeline.make_train_iterator(cfg, source, **kwargs)
  fresh.set_state(state)
  assert _equal(_batches(fresh, 3), straight[11:14])


def test_orbax_checkpoint_of_iterator_state(source, tmp_path):
  import orbax.checkpoint as ocp

  cfg = _config()
  kwargs = dict(seed=7, process_index=0, process_count=1, per_host_batch=4)
  straight = _batches(pipeline.make_train_iterator(cfg, source, **kwargs), 6)
  it = pipeline.make_train_iterator(cfg, source, **kwargs)
  _batches(it, 4)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as mngr:
    mngr.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  fresh = pipeline.make_train_iterator(cfg, source, **kwargs)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as mngr:
    restored = mngr.restore(
      4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh))
    )
  assert _equal(_batches(restored['data'], 2), straight[4:6])


def test_per_process_sharding_partitions_each_epoch(source):
  cfg = _config(16)
  count, batch = 3, 2
  steps = pipeline.steps_per_epoch(N, process_count=count, per_host_batch=batch)
  assert steps == 6  # (37 - 1) / 3 = 12 per process -> 6 batches.
  seen = []
  for p in range(count):
    it = pipeline.make_train_iterator(
      cfg, source, seed=3, process_index=p, process_count=count, per_host_batch=batch
    )
    seen.append(np.concatenate([b['label'] for b in _batches(it, steps)]))
  flat = np.concatenate(seen)
  assert len(flat) == len(set(flat)) == 36  # Disjoint, one epoch minus N % count.
  with pytest.raises(ValueError, match='process_index'):
    pipeline.make_train_iterator(
      cfg, source, seed=3, process_index=3, process_count=3, per_host_batch=batch
    )
  with pytest.raises(ValueError, match='fewer than one batch'):
    pipeline.make_train_iterator(
      cfg, source, seed=3, process_index=0, process_count=3, per_host_batch=13
    )


def test_same_batches_and_portable_state_with_zero_and_two_workers(tmp_path):
  """Real TFDS/ArrayRecord source, pickled into 2 worker processes; state moves between counts."""
  b = gldv2_fixture.ensure_fixture_dataset(str(tmp_path), num_classes=4, images_per_class=6)
  src = b.as_data_source()['train']
  cfg = _config(24)
  kwargs = dict(seed=11, process_index=0, process_count=1, per_host_batch=3)
  in_process = _batches(pipeline.make_train_iterator(cfg, src, num_workers=0, **kwargs), 9)
  first = pipeline.make_train_iterator(cfg, src, num_workers=0, **kwargs)
  _batches(first, 3)
  it = pipeline.make_train_iterator(cfg, src, num_workers=2, **kwargs)
  try:
    it.set_state(first.get_state())  # 0-worker state -> 2 workers.
    with_workers = _batches(it, 4)
    state = it.get_state()
  finally:
    it.close()
  assert _equal(in_process[3:7], with_workers)
  assert state['next_step'] == 7
  back = pipeline.make_train_iterator(cfg, src, num_workers=0, **kwargs)
  back.set_state(state)  # 2-worker state -> in-process.
  assert _equal(_batches(back, 2), in_process[7:9])


def test_state_from_another_stream_is_refused(source):
  it = pipeline.make_train_iterator(
    _config(), source, seed=1, process_index=0, process_count=1, per_host_batch=4
  )
  state = it.get_state()
  other = pipeline.make_train_iterator(
    _config(), source, seed=1, process_index=0, process_count=1, per_host_batch=8
  )
  with pytest.raises(ValueError, match='per_host_batch: saved 4, now 8'):
    other.set_state(state)


def test_eval_iterator_pads_and_covers_every_record_once(source):
  cfg = _config(20)
  labels, num_batches = [], set()
  for p in range(2):
    batches = list(
      pipeline.make_eval_iterator(cfg, source, process_index=p, process_count=2, per_host_batch=5)
    )
    num_batches.add(len(batches))
    for b in batches:
      assert b['image'].shape == (5, 20, 20, 3) and b['image'].dtype == np.uint8
      assert (b['label'][~b['mask']] == -1).all() and (b['image'][~b['mask']] == 0).all()
      labels.extend(b['label'][b['mask']].tolist())
  assert num_batches == {4}  # ceil(ceil(37 / 2) / 5) on both processes.
  assert sorted(labels) == list(range(N))
  again = list(
    pipeline.make_eval_iterator(cfg, source, process_index=1, process_count=2, per_host_batch=5)
  )
  assert _equal(again, batches)  # Deterministic (p == 1 ran last).


def test_decode_route_is_the_config_field_and_both_routes_apply_exif_orientation():
  rng = np.random.default_rng(3)
  records = []
  for i, orientation in enumerate((1, 6, 8, 3)):
    coarse = rng.integers(0, 256, size=(6, 10, 3), dtype=np.uint8)
    im = Image.fromarray(coarse).resize((160, 96), Image.BICUBIC)
    exif = im.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, 'JPEG', quality=90, exif=exif.tobytes())
    records.append({'image': buf.getvalue(), 'label': i})
  # Independent reference: OpenCV's reader (applies EXIF), central square, resize.
  ref = []
  for r in records:
    img = cv2.imdecode(np.frombuffer(r['image'], np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    t, l, h, w = decode.center_square_box(img.shape[:2])
    ref.append(decode.resize(img[t : t + h, l : l + w], 24, 24))
  images = {}
  for route in ('exact', 'fast'):
    cfg = _config(24)
    cfg.data.decode = route
    (batch,) = list(
      pipeline.make_eval_iterator(cfg, records, process_index=0, process_count=1, per_host_batch=4)
    )
    images[route] = batch['image']
  np.testing.assert_array_equal(images['exact'], np.stack(ref))
  diff = np.abs(images['fast'].astype(float) - np.stack(ref))
  assert 0 < diff.mean() < 4.0  # The fast route: different decoder, same oriented picture.
  cfg = _config(24)
  cfg.data.decode = 'cv2'
  with pytest.raises(ValueError, match=r"config.data.decode='cv2': must be one of 'exact', 'fast'"):
    pipeline.make_eval_iterator(cfg, records, process_index=0, process_count=1, per_host_batch=4)
  with pytest.raises(ValueError, match='config.data.decode'):
    pipeline.make_train_iterator(
      cfg, records, seed=0, process_index=0, process_count=1, per_host_batch=2
    )


def _worker_pids():
  import multiprocessing

  return {p.pid for p in multiprocessing.active_children()}


def test_validation_passes_repeat_the_same_batches_through_one_set_of_workers(source):
  """The training loop's periodic validation: every pass yields make_eval_iterator's batches (the
  first max_batches), with the worker process started once; a pass broken off mid-way does not
  shift the next one."""
  cfg = _config(20)
  kwargs = dict(process_index=1, process_count=2, per_host_batch=5)
  reference = list(pipeline.make_eval_iterator(cfg, source, **kwargs))[:3]
  before = _worker_pids()
  passes = pipeline.make_validation_passes(cfg, source, max_batches=3, num_workers=1, **kwargs)
  try:
    assert passes.num_batches == 3
    first = [{k: np.array(v) for k, v in b.items()} for b in passes.next_pass()]
    workers = _worker_pids() - before
    second = [{k: np.array(v) for k, v in b.items()} for b in passes.next_pass()]
    assert _worker_pids() - before == workers and len(workers) == 1
    broken = passes.next_pass()
    next(broken)  # an evaluation that failed after one batch
    third = list(passes.next_pass())
  finally:
    passes.close()
  assert _equal(first, reference) and _equal(second, reference) and _equal(third, reference)
