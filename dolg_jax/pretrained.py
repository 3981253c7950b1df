"""Public import API for outside weights (a stable contract): re-exports dolg_jax.weights.

  from dolg_jax import pretrained
  model, variables = pretrained.load(path)      # .pyth / .pth / converted directory
  head = pretrained.load_head(path)             # margin head, or None
  backbone = pretrained.load_backbone(path)     # pycls / torchvision ImageNet ResNet
  variables = pretrained.merge_backbone(variables, backbone)

The code lives in dolg_jax.weights (torch_format, architecture, converted, released, backbone).
"""

from dolg_jax.weights.architecture import default_model_config
from dolg_jax.weights.architecture import expected_shapes
from dolg_jax.weights.architecture import infer_model_config
from dolg_jax.weights.backbone import load_backbone
from dolg_jax.weights.backbone import merge_backbone
from dolg_jax.weights.converted import CONFIG_FILE
from dolg_jax.weights.converted import HEAD_FILE
from dolg_jax.weights.converted import VARIABLES_FILE
from dolg_jax.weights.converted import is_converted_dir
from dolg_jax.weights.converted import save_converted
from dolg_jax.weights.released import convert_state_dict
from dolg_jax.weights.released import load
from dolg_jax.weights.released import load_config
from dolg_jax.weights.released import load_head
from dolg_jax.weights.released import load_state_dict
from dolg_jax.weights.torch_format import CheckpointError
from dolg_jax.weights.torch_format import MissingKeysError
from dolg_jax.weights.torch_format import ShapeMismatchError
from dolg_jax.weights.torch_format import UnknownKeysError
from dolg_jax.weights.torch_format import read_torch_state_dict

__all__ = [
  'CONFIG_FILE',
  'HEAD_FILE',
  'VARIABLES_FILE',
  'CheckpointError',
  'MissingKeysError',
  'ShapeMismatchError',
  'UnknownKeysError',
  'convert_state_dict',
  'default_model_config',
  'expected_shapes',
  'infer_model_config',
  'is_converted_dir',
  'load',
  'load_backbone',
  'load_config',
  'load_head',
  'load_state_dict',
  'merge_backbone',
  'read_torch_state_dict',
  'save_converted',
]
