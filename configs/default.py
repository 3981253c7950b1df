"""Default configuration: DOLG R50 with the paper's recipe (Yang et al., ICCV 2021).

Override configs (r50.py, r101.py, ablations, tiny.py, demo.py) start from `get_config()` here and
change only what differs. Every field is documented where it is declared.
"""

import ml_collections

XLA_CACHE_DIR = '~/.cache/dolg_jax/xla'  # JAX's persistent compilation cache (train and eval)


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # ---------------------------------------------------------------- model (dolg_jax.models)
  m = c.model = ml_collections.ConfigDict()
  m.depth = 50                     # ResNet depth: 50 or 101 (pycls / torchvision v1.5 form).
  m.width = 64                     # Stem width (64 for the standard ResNets; smaller for tiny configs).
  m.stage_depths = ()              # Blocks per stage overriding `depth` (e.g. (1, 1, 1, 1) for tests).
  m.local_stage = 'res3'           # Stage feeding the local branch: 'res3' | 'res4' | 'both'.
  m.use_local_branch = True        # Ablation: False = global branch only.
  m.use_multi_atrous = True        # Paper: True. Released checkpoints: False.
  m.atrous_rates = (6, 12, 18)     # Dilations of the three 3x3 multi-atrous convolutions.
  m.atrous_dim = 512               # Channels of each multi-atrous branch.
  m.local_dim = 1024               # Channels of the local features f_l.
  m.use_self_attention = True      # Ablation: False = local features are the multi-atrous output.
  m.fusion = 'orthogonal'          # 'orthogonal' | 'concat' | 'hadamard'.
  m.global_pool = 'gem'            # 'gem' | 'gap'.
  m.gem_p = 3.0                    # GeM power (paper: 3, fixed).
  m.gem_p_learnable = False        # Released code: learnable p (param `pool_g/p`, shape (1,)).
  m.global_dim = 1024              # Width of f_g (Dense after pooling).
  m.embedding_dim = 512            # Final descriptor width.
  m.fusion_eps = 1e-6              # Added to |f_g|^2 in the orthogonal projection.
  m.bn_momentum = 0.9              # Flax momentum (= torch momentum 0.1).
  m.bn_epsilon = 1e-5
  m.bn_running_var = 'unbiased'    # BN running variance from the batch: 'unbiased' (torch.nn.BatchNorm2d,
                                   # the official trainer) | 'biased' (flax.linen.BatchNorm).
  m.zero_init_final_gamma = False  # Official yaml: True (each block's last BN scale starts at 0;
                                   # an ImageNet backbone init overwrites it).
  m.dense_init = 'pycls'           # fc_t/fc init: 'pycls' normal(0.01) | 'torch' (official: torch's
                                   # default Linear init, U(+-1/sqrt(fan_in))).

  # ---------------------------------------------------------------- margin head (dolg_jax.models.margins)
  h = c.head = ml_collections.ConfigDict()
  h.type = 'arcface'               # 'arcface' (paper) | 'curricularface' (released code).
  h.margin = 0.15
  h.scale = 30.0
  h.num_classes = 81313            # GLDv2-clean; overwritten from the dataset when they differ.
  h.t_momentum = 0.01              # CurricularFace EMA momentum for t.

  # ---------------------------------------------------------------- numerics
  c.compute_dtype = 'bfloat16'     # Activations/matmuls; params, BN stats and the loss stay float32.

  # ---------------------------------------------------------------- data (dolg_jax.data)
  d = c.data = ml_collections.ConfigDict()
  d.dataset = 'gldv2/clean'        # TFDS name/config.
  d.data_dir = ''                  # TFDS data_dir holding the prepared dataset.
  d.image_size = 512
  d.augmentation = 'paper'         # 'paper' (uint8, log-uniform aspect) | 'official' (pycls/DOLG:
                                   # float32, uniform aspect with w/h swap, PCA lighting; see
                                   # dolg_jax/data/official_augment.py).
  d.crop_scale = (0.25, 1.0)       # Random-resized-crop area range (official: (0.08, 1.0)).
  d.crop_ratio = (3 / 4, 4 / 3)    # Random-resized-crop aspect range (aspect distortion).
  d.random_flip = True
  d.decode = 'exact'               # 'exact': cv2.imread's pixels, EXIF orientation applied (official
                                   # reader) | 'fast': libjpeg-turbo fast DCT with DCT downscaling
                                   # (also oriented). Training and validation only: retrieval
                                   # evaluation always decodes exactly.
  d.lighting_std = 0.0             # PCA lighting noise std ('official' only; official: 0.1).
  d.num_workers = 8                # grain worker processes per host (0 = in-process).
  d.prefetch_buffer_size = 2
  d.read_threads = 2               # Decode threads inside each worker (grain ReadOptions).
  d.worker_buffer_size = 2         # Batches buffered per worker process.

  # ---------------------------------------------------------------- training (dolg_jax.training)
  t = c.train = ml_collections.ConfigDict()
  t.global_batch_size = 128
  t.grad_accum_steps = 1
  t.num_epochs = 100
  t.num_train_steps = -1           # -1: derived from num_epochs.
  t.base_learning_rate = 0.05      # Per 128 images; scaled linearly with the global batch.
  t.warmup_epochs = 5
  t.lr_schedule = 'per_step'       # 'per_step' (paper) | 'per_epoch' (official pycls get_epoch_lr).
  t.warmup_factor = 0.1            # Warm-up starts at this fraction of the lr (official pycls 0.1;
                                   # both schedules; per_epoch refuses 0: epoch 0 would be at lr 0).
  t.optimizer = 'sgd'              # 'sgd' (paper) | 'adamw' (the CPU demo trains from scratch).
  t.momentum = 0.9
  t.adam_b1 = 0.9                  # 'adamw' only.
  t.adam_b2 = 0.999
  t.nesterov = False               # Official config: True.
  t.weight_decay = 1e-4
  t.weight_decay_mask = 'all'      # 'all' (pycls reference) | 'kernels' (no BN/bias/GeM p).
  t.bn_mode = 'global'             # BN stats: 'global' batch | 'per_device' (reference: per GPU).
  t.bn_group_size = 0              # > 0: BN stats over groups of this many images (official: 8
                                   # per GPU); 0: as bn_mode says.
  t.log_every_steps = 50
  t.checkpoint_every_steps = 1000
  t.keep_checkpoints = 3            # Newest checkpoints kept (>= 1).
  t.allow_recipe_change_on_resume = False  # Resume with a changed recipe (lr, steps, margin...).
  t.async_checkpointing = True
  t.preemption_sync_every_steps = 10  # Multi-process without JAX's preemption service only:
                                      # how often SIGTERM flags are OR-reduced on the devices.
  t.eval_every_steps = 5000        # Validation accuracy (0 = never); also at the last step.
  t.eval_batches = 100             # Validation batches (global batch size) per evaluation; 0 = all.
  t.eval_retrieval = False         # Also run dolg_jax.eval (retrieval mAP, config.eval) then.
  t.backbone_init = 'pycls_r50'    # ImageNet start (dolg_jax.weights.imagenet): 'pycls_r50' |
                                   # 'pycls_r101' (official) | 'torchvision_r50' | 'torchvision_r101'
                                   # | an http(s) URL | a local .pyth/.pth file | 'none' (random).
  t.backbone_cache_dir = ''        # Downloaded backbones; '' = $DOLG_JAX_WEIGHTS_CACHE, else
                                   # ~/.cache/dolg_jax/weights.
  t.init_checkpoint = ''           # Start from a whole DOLG model (training/init_checkpoint.py): a
                                   # released .pyth/.pth, a converted dir, or one of our workdirs /
                                   # checkpoint steps; '' = off. Takes precedence over backbone_init.
                                   # Not a resume: the optimizer and the step start fresh.
  t.model_lr_multiplier = 1.0      # Learning rate x this for the DOLG model (every parameter but
                                   # the margin head's); 0 = frozen.
  t.head_lr_multiplier = 1.0       # Learning rate x this for the margin head.
  t.freeze_bn = False              # BatchNorm normalises with its running statistics and keeps them
                                   # (fine-tuning on small datasets).
  t.xla_cache_dir = XLA_CACHE_DIR  # Persistent compilation cache of dolg_jax.main ('' = off).
  t.deterministic = False          # GPU: XLA deterministic ops (slower; see training/determinism.py).
  t.init_on_one_device = True      # Init on one device then reshard (False: jit(init, out_shardings)).
  t.profile_steps = (0, 0)         # (start, num): profiler trace of steps start+1..start+num on
                                   # process 0 -> WORKDIR/profile (TensorBoard Profile tab); (0, 0) = off.

  # ---------------------------------------------------------------- mesh (dolg_jax.sharding)
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                 # Data-parallel axis size (-1: all devices / model).
  c.mesh.model = 1                 # Splits the margin head's class dimension.

  # ---------------------------------------------------------------- evaluation (dolg_jax.retrieval)
  e = c.eval = ml_collections.ConfigDict()
  e.datasets = ('roxford5k', 'rparis6k')  # Prepared revisitop names | 'gldv2_retrieval'.
  e.data_dir = ''
  e.scales = (0.7071, 1.0, 1.4142)
  e.scale_pool = 'mean'            # Over scales: 'mean' (official) | 'max' (SuperGlobal scale-GeM).
  e.max_side = 0                   # Long-side cap before scaling (0 = none; DELG: 1024).
  e.use_distractors = False        # Add revisitop1m.
  e.batch_size = 16
  e.crop_rounding = 'trunc'        # Query box -> pixels: 'trunc' (official int()) | 'round' | 'expand'.
  e.pad = True                     # Exact-size images in padded canvases, padding masked (bounds compiles).
  e.bucket = 32                    # Without pad: snap scaled sides to multiples of this; 0 = exact.
  e.geometric_from = 0             # Without pad, > 0: beyond this side, geometric buckets (0 = never).
  e.steps_per_octave = 8           # Geometric bucket density (ratio 2**(1/8) ~ 9%).
  e.canvas_steps_per_octave = 4    # With pad: canvas side ladder density above 256 (2**(1/4) ~ 19%).
  e.crop_canvas_steps_per_octave = 1  # The same for query crops (every size occurs): 512, 1024, ...
  e.min_side = 64                  # Scaled sides below this are raised to it (the model needs >= 64).
  e.num_workers = 4                # Host threads decoding / cropping / resizing (0 = inline).
  e.compute_dtype = 'float32'      # Extraction dtype for our checkpoints ('bfloat16' is faster).
  e.distractors = 'revisitop1m'    # TFDS name of the +1M distractor set (with use_distractors).
  e.qe_k = 0                       # alpha-QE neighbours (0 = off).
  e.qe_alpha = 3.0
  e.dba_k = 0                      # Database-side augmentation neighbours (0 = off; base sets only).
  e.dba_alpha = 3.0
  e.search_chunk_size = 65536      # Database rows per similarity chunk on device.
  e.rerank = ''                    # '' (off) | 'superglobal' (SuperGlobal re-ranking of the top M;
                                   # base sets, +1M and gldv2_retrieval; not with qe_k > 0).
  e.rerank_m = 400                 # SuperGlobal: candidates re-ranked per query (M).
  e.rerank_k = 9                   # SuperGlobal: neighbours averaged into each candidate (K).
  e.rerank_beta = 0.15             # SuperGlobal: neighbour weight factor (beta).
  # SuperGlobal's extraction modules, applied to the model at evaluation (our checkpoints and
  # released weights alike; part of the descriptor-cache key). See dolg_jax.models.dolg.DOLG.
  e.gem_plus_p = 0.0               # GeM+: global GeM power at test time (0 = off; SuperGlobal: 4.6).
  e.regional_gem = False           # Regional-GeM on res4 before the global pooling.
  e.relu_plus = 0.0                # ReLU+: backbone activation floor (0 = ReLU; SuperGlobal: 0.014).
  e.report_queries = 10            # Queries shown in report.html / report.png (0 = no report).
  e.cache = True                   # Cache descriptors in OUTPUT_DIR/cache (keyed by weights + settings).
  e.output_dir = ''                # '' = WORKDIR/eval or <checkpoint>_eval.
  e.xla_cache_dir = XLA_CACHE_DIR  # Persistent compilation cache of dolg_jax.eval / index ('' = off).
  e.profile_batches = (0, 0)       # (start, num): profiler trace of extraction batches start..start+num-1
                                   # on process 0 -> OUTPUT_DIR/profile; (0, 0) = off.
  return c
