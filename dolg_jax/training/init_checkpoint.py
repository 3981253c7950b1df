"""`config.train.init_checkpoint`: start a run from a whole DOLG model (fine-tuning).

PATH: a released `.pyth` / `.pth` (read with torch), a `python -m dolg_jax.convert` directory, or
one of our runs (a workdir, its `checkpoints/` or a step directory, verified against its record).
`validate(config)` checks the fine-tuning fields (config_check runs it); `prepare(config,
workdir)` (before anything is written), unless the workdir holds a checkpoint to resume from,
`load`s PATH and `check`s its architecture; `start(setup, source, rng)` gives (the step-0 state:
every model variable, the head and `t` when the class counts match, else a fresh head; its
shardings; the manifest's `start` record).
Errors: InitCheckpointError naming each differing field with both values. Behaviour: README
(`train.init_checkpoint`). Design notes: docs/design_notes.md.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from dolg_jax import models
from dolg_jax import sharding as shd
from dolg_jax.weights import architecture
from dolg_jax.weights import checkpoint as checkpoint_lib
from dolg_jax.weights import converted
from dolg_jax.weights import imagenet
from dolg_jax.weights import released
from dolg_jax.weights import torch_format
from dolg_jax.training import state as state_lib

KINDS = ('released checkpoint', 'converted directory', 'training checkpoint')
# Fields of config.model that shape the model's variables or its computation (the DOLG module
# marks them), in message order; the others (gem_p's initial value, fusion_eps, BatchNorm momentum
# / epsilon, initialisers) may differ from the checkpoint's. stage_depths is compared with depth.
ARCHITECTURE_FIELDS = tuple(f for f in models.ARCHITECTURE_FIELDS if f != 'stage_depths')
_BLOCKS = {depth: blocks for blocks, depth in architecture.DEPTH_FROM_BLOCKS.items()}


class InitCheckpointError(ValueError):
  """train.init_checkpoint (or a fine-tuning field) cannot be used as configured."""


@dataclasses.dataclass
class Source:
  """A read init checkpoint."""

  spec: str  # config.train.init_checkpoint as given
  path: str  # absolute path; for our runs the resolved step directory
  kind: str  # one of KINDS
  sha256: str  # the file's, or over the directory's files
  model_config: ml_collections.ConfigDict
  variables: dict  # {'params', 'batch_stats'} (numpy)
  head: dict | None  # {'weight': (num_classes, dim), 't': float} or None (no head saved)

  @property
  def num_classes(self) -> int | None:
    return None if self.head is None else int(self.head['weight'].shape[0])


# ------------------------------------------------------------------------------------ checks


def validate(config: ml_collections.ConfigDict) -> None:
  """The fine-tuning fields' types and ranges (InitCheckpointError naming the field)."""
  t = config.train
  if not isinstance(t.init_checkpoint, str):
    raise InitCheckpointError(
      f'config.train.init_checkpoint={t.init_checkpoint!r}: must be a path (string; \'\' = off)'
    )
  for field in ('model_lr_multiplier', 'head_lr_multiplier'):
    value = t[field]
    if (
      isinstance(value, bool)
      or not isinstance(value, (int, float))
      or not math.isfinite(value)
      or value < 0
    ):
      raise InitCheckpointError(
        f'config.train.{field}={value!r}: must be a number >= 0 (1 = the '
        'scheduled learning rate, 0 = frozen)'
      )
  if not isinstance(t.freeze_bn, bool):
    raise InitCheckpointError(f'config.train.freeze_bn={t.freeze_bn!r}: must be True or False')


def _effective_blocks(cfg) -> tuple[int, ...]:
  return tuple(cfg.stage_depths) if tuple(cfg.stage_depths) else _BLOCKS.get(int(cfg.depth), ())


def architecture_mismatches(
  ours: ml_collections.ConfigDict, theirs: ml_collections.ConfigDict
) -> list[tuple[str, Any, Any]]:
  """(field, configured value, checkpoint's value) of every architecture field that differs;
  fields that do not apply (e.g. atrous widths without the multi-atrous module) are skipped."""
  out = []
  for field in ARCHITECTURE_FIELDS:
    if field == 'depth':
      a, b = _effective_blocks(ours), _effective_blocks(theirs)
      if a != b:
        if not tuple(ours.stage_depths) and not tuple(theirs.stage_depths):
          out.append(('depth', int(ours.depth), int(theirs.depth)))
        else:
          out.append(('stage_depths', a, b))
      continue
    local = bool(ours.use_local_branch) and bool(theirs.use_local_branch)
    if (
      field in ('local_stage', 'use_multi_atrous', 'local_dim', 'use_self_attention', 'fusion')
      and not local
    ):
      continue
    if field in ('atrous_rates', 'atrous_dim') and not (
      local and ours.use_multi_atrous and theirs.use_multi_atrous
    ):
      continue
    if field == 'gem_p_learnable' and not (ours.global_pool == 'gem' == theirs.global_pool):
      continue
    a, b = ours[field], theirs[field]
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
      a, b = tuple(a), tuple(b)
    if a != b:
      out.append((field, a, b))
  return out


def _tree_mismatches(variables: dict, model_cfg: ml_collections.ConfigDict) -> list[str]:
  expected = architecture.expected_shapes(model_cfg)
  got = {p: tuple(np.shape(v)) for p, v in torch_format.flatten_tree(variables).items()}
  out = [f'{"/".join(p)} missing' for p in expected if p not in got]
  out += [f'{"/".join(p)} not in the model' for p in got if p not in expected]
  out += [
    f'{"/".join(p)} {got[p]} != {tuple(s)}'
    for p, s in expected.items()
    if p in got and got[p] != tuple(s)
  ]
  return out


# ------------------------------------------------------------------------------------ reading


def load(spec: str) -> Source:
  """Reads the init checkpoint `spec` (see the module docstring)."""
  path = os.path.abspath(os.path.expanduser(spec))
  if os.path.isfile(path):
    sd = torch_format.read_torch_state_dict(path)
    cfg, variables, head = released.convert_state_dict(sd, path)
    return Source(spec, path, KINDS[0], imagenet.sha256_file(path), cfg, variables, _head(head))
  if converted.is_converted_dir(path):
    cfg, variables = converted.load_converted(path)
    head = released.load_head(path)
    return Source(
      spec,
      path,
      KINDS[1],
      imagenet.sha256_dir(path),
      cfg,
      variables,
      _head(None if head is None else jax.tree.map(np.asarray, head)),
    )
  if os.path.isdir(path):
    try:
      step_dir = os.fspath(checkpoint_lib.resolve_step_dir(path))
    except FileNotFoundError:
      raise InitCheckpointError(
        f'config.train.init_checkpoint={spec!r}: {path} is neither a converted directory '
        f'(no {converted.CONFIG_FILE}) nor a workdir, checkpoints directory or step directory '
        'with a checkpoint'
      ) from None
    variables, head, run_config = checkpoint_lib.load_state(step_dir)
    if 'model' not in run_config or 'head' not in run_config:
      raise InitCheckpointError(
        f'{step_dir}: its run record holds no config (model and head); '
        'start from a step written by this version'
      )
    cfg = architecture.config_from_json(run_config['model'])
    n = int(run_config['head']['num_classes'])
    head = {'weight': np.asarray(head['weight'])[:n], 't': float(np.asarray(head['t']))}
    return Source(spec, step_dir, KINDS[2], imagenet.sha256_dir(step_dir), cfg, variables, head)
  raise InitCheckpointError(
    f'config.train.init_checkpoint={spec!r}: {path} does not exist '
    '(expected a released .pyth/.pth, a converted directory, or a '
    'workdir / checkpoint step)'
  )


def _head(head: dict | None) -> dict | None:
  if head is None:
    return None
  return {
    'weight': np.asarray(head['weight'], np.float32),
    't': float(np.asarray(head['t']).reshape(())) if 't' in head else 0.0,
  }


def check(source: Source, model_cfg: ml_collections.ConfigDict) -> None:
  """InitCheckpointError naming every architecture field in which `source` differs from the
  configured model (and, as a last guard, any variable whose path or shape differs)."""
  mismatches = architecture_mismatches(model_cfg, source.model_config)
  if mismatches:
    fields = '; '.join(
      f'config.model.{f}={a!r} but the checkpoint has {b!r}' for f, a, b in mismatches
    )
    sets = ' '.join(f'--config.model.{f}={b!r}'.replace("'", '') for f, _, b in mismatches)
    raise InitCheckpointError(
      f'config.train.init_checkpoint={source.spec!r} ({source.kind}) has another architecture: '
      f'{fields}. Configure the checkpoint\'s architecture ({sets}) or start from another '
      'checkpoint'
    )
  bad = _tree_mismatches(source.variables, model_cfg)
  if bad:
    raise InitCheckpointError(
      f'config.train.init_checkpoint={source.spec!r} ({source.kind}): its variables do not fit '
      f'config.model ({len(bad)} differences, first: {"; ".join(bad[:3])})'
    )


def prepare(config: ml_collections.ConfigDict, workdir: str | None = None) -> Source | None:
  """When the run starts from an init checkpoint (it is set and `workdir` holds no checkpoint to
  resume from), reads it and checks its architecture. Call after `config_check.validate` (which
  runs `validate`) and before anything is written. None when there is nothing to read."""
  spec = config.train.init_checkpoint
  if not spec:
    return None
  if workdir is not None and checkpoint_lib.list_steps(checkpoint_lib.checkpoint_dir(workdir)):
    return None  # A resume: the workdir's own checkpoints are used.
  source = load(spec)
  check(source, config.model)
  return source


# ------------------------------------------------------------------------------------ applying


def start(
  setup: state_lib.TrainSetup, source: Source | None, rng: jax.Array
) -> tuple[state_lib.TrainState, state_lib.TrainState, dict]:
  """(state, shardings, manifest record) of a fresh run initialised from `source` (read now when
  None: e.g. the workdir's checkpoints were all set aside as damaged)."""
  config = setup.config
  if source is None:
    source = load(config.train.init_checkpoint)
    check(source, config.model)
  state, shardings = state_lib.create_train_state(setup, rng)
  model = shd.place(source.variables['params'], shardings.params['model'])
  stats = shd.place(source.variables['batch_stats'], shardings.batch_stats)
  params = {**state.params, 'model': model}
  head_t = state.head_t
  n, n_ckpt = setup.num_classes, source.num_classes
  if n_ckpt == n:
    weight = source.head['weight']
    c_pad = state.params['head']['weight'].shape[0]
    if c_pad > n:  # padding rows (masked out): as a fresh head's
      fresh = models.margins.init_head_weight(jax.random.fold_in(rng, 1), c_pad, weight.shape[1])
      weight = np.concatenate([weight, np.asarray(fresh)[n:]], axis=0)
    params['head'] = {'weight': shd.place(weight, shardings.params['head']['weight'])}
    head_t = shd.place(np.asarray(source.head['t'], np.float32), shardings.head_t)
    head_note = f'loaded ({n} classes, t={source.head["t"]:g})'
    logging.info('init_checkpoint: margin head and t loaded (%d classes, the dataset\'s).', n)
  else:
    why = (
      'has no margin head'
      if n_ckpt is None
      else f'has a margin head of {n_ckpt} classes, the dataset {n}'
    )
    head_note = f'initialised: the checkpoint {why}'
    logging.info(
      'init_checkpoint %s: the margin head is initialised (as a fresh run\'s) and t = 0.', why
    )
  state = state.replace(params=params, batch_stats=stats, head_t=head_t)
  n_arrays = len(jax.tree.leaves(source.variables))
  logging.info(
    'Start: init_checkpoint %s (%s, sha256 %s): %d model arrays loaded; step 0, fresh '
    'optimizer; train.backbone_init=%r not used.',
    source.path,
    source.kind,
    source.sha256,
    n_arrays,
    config.train.backbone_init,
  )
  record = {
    'used': 'init_checkpoint',
    'init_checkpoint': source.spec,
    'path': source.path,
    'kind': source.kind,
    'sha256': source.sha256,
    'model_arrays': n_arrays,
    'head': head_note,
    'backbone_init': f'{config.train.backbone_init} (not used)',
  }
  source.variables = source.head = None  # The state holds them now (a released R101: ~400 MB).
  return state, shardings, record


def start_record(config: ml_collections.ConfigDict, resumed_step: int | None) -> dict:
  """The manifest's `start` entry of a run that did not start from an init checkpoint."""
  if resumed_step is not None:
    return {
      'used': 'resumed',
      'step': int(resumed_step),
      'init_checkpoint': config.train.init_checkpoint or None,
      'note': 'the workdir\'s own checkpoint; the first start is the manifest\'s top entry',
    }
  return {'used': 'backbone_init', 'backbone_init': config.train.backbone_init}
