"""DOLG ResNet-101 trained field for field as the official code trains it (feymanpriv/DOLG).

Sources: configs/resnet101_delg_8gpu.yaml, core/config.py (defaults the yaml keeps), core/trainer.py
and core/optimizer.py (pycls `get_epoch_lr`), datasets/transforms.py (pycls). On top of
configs/released_r101.py (no multi-atrous, learnable GeM p, CurricularFace m=0.15 s=30, per-device
BatchNorm, 5-scale evaluation) this sets:

- data: the official augmentation (random-sized crop, area U(0.08, 1), aspect U(3/4, 4/3) with the
  w/h swap, flip, PCA lighting std 0.1; float32 images), every listed image in train (the official
  train_list.txt has no held-out part: dataset 'gldv2/clean_all');
- optimisation: SGD momentum 0.9 with Nesterov, weight decay 1e-4 on every parameter, lr 0.01 for
  the batch of 64 (base_learning_rate 0.02 per 128 images), 100 epochs, per-epoch cosine with 5
  warm-up epochs starting at 0.1 x; float32 compute (the official trainer has no mixed precision);
- BatchNorm statistics over groups of 8 images (8 GPUs x 8 images in the official run), whatever
  the device count;
- init: zero-initialised last BN gamma of each block (ZERO_INIT_FINAL_GAMMA; an ImageNet backbone
  overwrites it), torch's default init for fc_t and fc.

Variants (`--config=configs/official_r101.py:VARIANT`):
- '' (default): the yaml's 224 x 224 crops, global batch 64.
- 'paper_size': the paper's 512 x 512 crops and batch 128 (lr scaled linearly: 0.02), everything
  else official. Which of the two sizes produced the released weights is not published: the
  paper states 512 / 128, the public yaml 224 / 64; the default follows the code.

  python -m dolg_jax.main --config=configs/official_r101.py --workdir=DIR \
      --config.data.data_dir=TFDS_DIR
"""

from dolg_jax.configs import released_r101

VARIANTS = ('', 'paper_size')


def get_config(variant: str = ''):
  if variant not in VARIANTS:
    raise ValueError(f'configs/official_r101.py: unknown variant {variant!r}; known: '
                     f"{[v for v in VARIANTS if v]} (or none)")
  c = released_r101.get_config()
  c.compute_dtype = 'float32'
  c.model.zero_init_final_gamma = True
  c.model.dense_init = 'torch'

  d = c.data
  d.dataset = 'gldv2/clean_all'
  d.augmentation = 'official'
  d.crop_scale = (0.08, 1.0)
  d.crop_ratio = (3 / 4, 4 / 3)
  d.random_flip = True
  d.lighting_std = 0.1

  t = c.train
  t.optimizer = 'sgd'
  t.momentum = 0.9
  t.nesterov = True
  t.weight_decay = 1e-4
  t.weight_decay_mask = 'all'
  t.num_epochs = 100
  t.num_train_steps = -1
  t.lr_schedule = 'per_epoch'
  t.warmup_epochs = 5
  t.warmup_factor = 0.1
  t.bn_mode = 'per_device'
  t.bn_group_size = 8
  if variant == 'paper_size':
    d.image_size = 512
    t.global_batch_size = 128
  else:
    d.image_size = 224
    t.global_batch_size = 64
  t.base_learning_rate = 0.02      # Per 128 images: 0.01 at the yaml's batch 64.
  return c
