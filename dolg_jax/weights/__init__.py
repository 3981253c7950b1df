"""Weights from outside a training run: released DOLG checkpoints, ImageNet backbones, converted
directories.

  torch_format   torch state dicts: reading, key/layout mapping, CheckpointError and its kinds
  architecture   the model config of a checkpoint (inferred from keys, or stored as JSON)
  converted      directories written by `python -m dolg_jax.convert` (read without torch)
  released       `load(path) -> (model, variables)`, `load_config`, `load_head`
  backbone       ImageNet backbones (pycls, torchvision): `load_backbone`, `merge_backbone`
  imagenet       backbone names -> public URLs; download once into a cache, verify checksums
  checkpoint     model variables of our own orbax training checkpoints (for evaluation)

Importing this package imports none of them; `dolg_jax.pretrained` re-exports the public API.
"""
