"""DOLG ResNet-101, the paper's settings."""

from configs import default


def get_config():
  c = default.get_config()
  c.model.depth = 101
  return c
