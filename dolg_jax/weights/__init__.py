"""Weights from outside a run: ImageNet backbones (`imagenet`: names -> public URLs, download once
into a cache, verify checksums) and released DOLG checkpoints."""
