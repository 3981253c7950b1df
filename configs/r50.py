"""DOLG ResNet-50 with the paper's recipe (Yang et al., ICCV 2021), trained on GLDv2-clean.

Model: multi-atrous local branch on res3 with self-attention, GeM p=3 (fixed), orthogonal fusion,
512-d descriptor; ArcFace m=0.15 s=30. Training: 512x512 random-resized crops, global batch 128,
SGD momentum 0.9, weight decay 1e-4, lr 0.05 per 128 images (linear scaling), 5 warm-up epochs then
per-step cosine, 100 epochs, bf16 compute with float32 weights and loss, global-batch BatchNorm.
Starts from the pycls ImageNet ResNet-50 (`pycls_r50`, downloaded once into the weights cache and
verified; see dolg_jax.weights.imagenet); `--config.train.backbone_init=none` trains from random
weights, `torchvision_r50` or a local file are the alternatives.

  python -m dolg_jax.main --config=configs/r50.py --workdir=DIR --config.data.data_dir=TFDS_DIR
Smaller GPUs: --config.train.grad_accum_steps=2 (or 4) keeps the global batch at 128: one update
and one CurricularFace `t` step per 128 images, as without accumulation; BatchNorm statistics are
then per microbatch (64 or 32 images; see dolg_jax/training/step.py).
Reference-like per-GPU BatchNorm: --config.train.bn_mode=per_device.
"""

from dolg_jax.configs import default


def get_config():
  c = default.get_config()
  c.model.depth = 50
  c.train.backbone_init = 'pycls_r50'   # ImageNet start: R-50-1x64d_dds_8gpu.pyth (pycls zoo).
  c.train.num_train_steps = -1       # 100 epochs.
  c.train.log_every_steps = 50
  c.train.checkpoint_every_steps = 1000
  return c
