"""DOLG ResNet-101 with the paper's recipe (see configs/r50.py; only the depth differs).

  python -m dolg_jax.main --config=configs/r101.py --workdir=DIR --config.data.data_dir=TFDS_DIR
"""

from configs import r50


def get_config():
  c = r50.get_config()
  c.model.depth = 101
  return c
