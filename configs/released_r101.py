"""DOLG ResNet-101 as in the released code/checkpoints (feymanpriv/DOLG), not the paper.

Differences from configs/r101.py: no multi-atrous module (its flag defaults off in the released
code), learnable GeM p (init 3), CurricularFace head (the released `Arcface` class; EMA `t`,
momentum 0.01) with m=0.15, s=30, and BatchNorm statistics per device as in the PyTorch DDP run.
Like the official training it starts from the pycls ImageNet ResNet-101 (`pycls_r101`).

  python -m dolg_jax.main --config=configs/released_r101.py --workdir=DIR \
      --config.data.data_dir=TFDS_DIR
"""

from dolg_jax.configs import r101


def get_config():
  c = r101.get_config()
  c.model.use_multi_atrous = False
  c.model.gem_p_learnable = True
  c.head.type = 'curricularface'
  c.train.bn_mode = 'per_device'
  c.train.backbone_init = 'pycls_r101'  # The official TRAIN.WEIGHTS (also set by r101.py).
  # Evaluation as reported for the released weights: query crops, five scales.
  c.eval.scales = (0.3535, 0.5, 0.7071, 1.0, 1.4142)
  return c
