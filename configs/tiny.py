"""Tiny DOLG for CPU tests and smoke runs: width 8, one block per stage, 64x64 images.

Trains on CPU with no preparation step: the GLDv2-format fixture is written and prepared under
`data.data_dir` on first use (see dolg_jax.training.inputs). Exits after
`train.num_train_steps`.

  python -m dolg_jax.main --config=configs/tiny.py --workdir=/tmp/tiny
"""

from dolg_jax.configs import default


def get_config():
  c = default.get_config()
  m = c.model
  m.width = 8
  m.stage_depths = (1, 1, 1, 1)
  m.atrous_rates = (1, 2, 3)
  m.atrous_dim = 8
  m.local_dim = 32
  m.global_dim = 32
  m.embedding_dim = 16
  c.head.num_classes = 8          # The fixture's class count (checked against the dataset).
  c.compute_dtype = 'float32'

  d = c.data
  d.dataset = 'gldv2/clean'
  d.data_dir = '~/.cache/dolg_jax/tiny_gldv2'  # Fixture written + prepared here on first use.
  d.make_fixture = True            # Only in tiny-style configs: build the GLDv2-format fixture.
  d.image_size = 64
  d.num_workers = 0

  t = c.train
  t.global_batch_size = 8
  t.num_train_steps = 20
  t.warmup_epochs = 1
  t.base_learning_rate = 0.05
  t.log_every_steps = 5
  t.checkpoint_every_steps = 10
  t.keep_checkpoints = 2
  t.eval_every_steps = 10
  t.backbone_init = 'none'         # Random start: no ImageNet backbone has this width (offline).
  return c
