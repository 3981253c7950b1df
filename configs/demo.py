"""The embedded demo: a small DOLG trained and evaluated end to end on a laptop-class CPU.

  python -m dolg_jax.demo                     # about 10 minutes on 2 CPU cores, no downloads

Data (procedural landmark-like places, dolg_jax.data.synthetic.demo_scenes) is written in the real
GLDv2 layout for training and in the revisited-Oxford layout ('rdemo') for evaluation, then
converted with the real builders. Training and evaluation places are disjoint.

Recipe differences from the paper, for training from scratch on a CPU in minutes (the paper starts
from ImageNet weights on 8 GPUs): width 16 with one block per stage, 64x64 crops, AdamW
(lr 3e-3), ArcFace scale 16 (margin 0.15 as in the paper), 64-d descriptors.
"""

import ml_collections

from dolg_jax.configs import default


def get_config():
  c = default.get_config()
  m = c.model
  m.width = 16
  m.stage_depths = (1, 1, 1, 1)
  m.atrous_rates = (1, 2, 3)      # res3 is 4x4 at 64 px: the paper's 6/12/18 would see only padding
  m.atrous_dim = 64
  m.local_dim = 256
  m.global_dim = 256
  m.embedding_dim = 64
  c.head.scale = 16.0
  c.head.num_classes = 120        # checked against the dataset
  c.compute_dtype = 'float32'

  d = c.data
  d.dataset = 'gldv2/clean'
  d.data_dir = '~/.cache/dolg_jax/demo/tfds'
  d.image_size = 64
  d.num_workers = 0

  t = c.train
  t.optimizer = 'adamw'
  t.base_learning_rate = 0.012    # per 128 images: 3e-3 at batch 32
  t.global_batch_size = 32
  t.num_train_steps = 1500
  t.warmup_epochs = 1
  t.weight_decay = 1e-4
  t.log_every_steps = 150         # ten progress lines: the demo fits on one screen
  t.checkpoint_every_steps = 500
  t.keep_checkpoints = 1
  t.eval_every_steps = 0          # the demo evaluates retrieval itself, before and after training
  t.backbone_init = 'none'        # trains from scratch (no download; see the docstring)

  e = c.eval
  e.datasets = ('rdemo',)
  e.data_dir = '~/.cache/dolg_jax/demo/tfds'
  e.scales = (0.7071, 1.0)
  e.batch_size = 16
  e.report_queries = 10

  # The demo data (dolg_jax.data.synthetic.demo_data.DemoSpec fields).
  c.demo = ml_collections.ConfigDict()
  c.demo.root = '~/.cache/dolg_jax/demo'
  c.demo.num_train_places = 120
  c.demo.train_views = 20
  c.demo.num_query_places = 20
  c.demo.num_distractor_places = 40
  c.demo.seed = 0
  return c
