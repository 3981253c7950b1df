"""DOLG ResNet-50, the paper's settings."""

from configs import default


def get_config():
  return default.get_config()
