"""DOLG ResNet-101 with the paper's recipe (see configs/r50.py; only the depth differs).

Starts from the pycls ImageNet ResNet-101 `R-101-1x64d_dds_8gpu.pyth` (`pycls_r101`), as the
official training does; offline, place the file in the weights cache (the error says where).

  python -m dolg_jax.main --config=configs/r101.py --workdir=DIR --config.data.data_dir=TFDS_DIR
"""

from dolg_jax.configs import r50


def get_config():
  c = r50.get_config()
  c.model.depth = 101
  c.train.backbone_init = 'pycls_r101'  # ImageNet start: R-101-1x64d_dds_8gpu.pyth, as the official
                                        # training (TRAIN.WEIGHTS).
  return c
