"""`train_and_evaluate(config, workdir)`: the training loop.

One pass per step: next host batch -> global sharded batch -> jitted train step (async dispatch).
Metrics are fetched from the device only at log / checkpoint / eval boundaries. A checkpoint is
written only after every loss since the previous check was verified finite, so a NaN/inf loss
stops the run (NonFiniteLossError) with the last good checkpoint intact.
"""

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from dolg_jax import sharding as shd
from dolg_jax.retrieval import evaluate as evaluate_lib
from dolg_jax.retrieval import scoring
from dolg_jax.training import checkpointing
from dolg_jax.training import config_check
from dolg_jax.training import determinism
from dolg_jax.training import init_checkpoint
from dolg_jax.training import inputs
from dolg_jax.training import manifest as manifest_lib
from dolg_jax.training import metric_logging
from dolg_jax.training import preemption
from dolg_jax.training import resume_check
from dolg_jax.training import schedule
from dolg_jax.training import state as state_lib
from dolg_jax.training import step as step_lib
from dolg_jax.training import utilisation
from dolg_jax.training import workdir_lock
from dolg_jax.weights import imagenet


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


def _check_finite(records: list[dict[str, Any]], first_step: int, workdir: str,
                  last_saved: int | None, restored: int | None = None) -> None:
  """Raises NonFiniteLossError at the first step whose loss, gradient, parameters or BatchNorm
  statistics / CurricularFace t are not finite.

  Parameters are checked too: a finite loss with a NaN gradient yields NaN weights that must not
  be checkpointed; so are the running statistics (BatchNorm keeps the loss finite while the running
  variance of a diverging activation overflows). When nothing was saved since the state was restored (`restored` = its step),
  the advice is not about the learning rate: the same recipe reached that state finitely.
  """
  for i, r in enumerate(records):
    if (not all(np.isfinite(r[k]) for k in ('loss', 'grad_norm', 'param_norm'))
        or r['nonfinite_state'] != 0):
      where = (f'step {last_saved} in {checkpointing.checkpoint_dir(workdir)}'
               if last_saved is not None else 'none yet')
      head = (f'Non-finite training values at step {first_step + i}: loss {r["loss"]}, grad_norm '
              f'{r["grad_norm"]}, param_norm {r["param_norm"]}, non-finite BatchNorm '
              f'statistics {int(r["nonfinite_state"])}. Stopping without saving this '
              f'state; last good checkpoint: {where}.')
      if restored is not None and last_saved == restored:
        raise NonFiniteLossError(
            f'{head} This is within {first_step + i - restored} step(s) of resuming from step '
            f'{restored}, whose contents verified against their checksums: check the input data '
            '(python -m dolg_jax.data.prepare --verify) and what differs from the original run '
            '(config, code version, devices; see manifest.json) before rerunning.')
      raise NonFiniteLossError(
          f'{head} Lower config.train.base_learning_rate or check the input data, then rerun '
          'the same command to resume from that checkpoint.')


def _mean_metrics(records: list[dict[str, Any]]) -> dict[str, float]:
  return {k: float(np.mean([r[k] for r in records])) for k in records[0]}


def evaluate(eval_step, state, batches, mesh, max_batches: int = 0) -> dict[str, float]:
  """Validation loss and top-1 accuracy (nearest class centre) over `batches` (the first
  `max_batches` when > 0; every process yields the same number, so all stop together)."""
  sums = None   # on the device: one host fetch per evaluation, not per batch
  for i, batch in enumerate(batches):
    if 0 < max_batches <= i:
      break
    out = eval_step(state, shd.global_batch(mesh, batch))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  if hasattr(batches, 'close'):   # grain iterators: stop their worker processes.
    batches.close()
  totals = ({'correct': 0.0, 'count': 0.0, 'loss_sum': 0.0} if sums is None
            else {k: float(v) for k, v in jax.device_get(sums).items()})
  n = max(totals['count'], 1.0)
  return {'val_accuracy': totals['correct'] / n, 'val_loss': totals['loss_sum'] / n,
          'val_examples': totals['count']}


def retrieval_eval(evaluator: evaluate_lib.RunEvaluator, state, workdir: str, step: int) -> dict:
  """Retrieval mAP of the current weights (config.eval datasets), through the evaluation library
  (`evaluator`: the run's one, whose compiled extractor every evaluation reuses)."""
  variables = shd.host_replicated({'params': state.params['model'],
                                   'batch_stats': state.batch_stats})
  out = evaluator(variables, os.path.join(workdir, 'eval', f'step_{step}'),
                  source=f'train:{workdir}@{step}')
  return scoring.flat_maps(out['results'])


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds a checkpoint); returns the last logged metrics,
  plus 'preempted': True when SIGTERM stopped the run after saving its checkpoint."""
  t_cfg = config.train
  # Before anything is written: a bad field fails here, naming itself.
  config_check.validate(config, device_count=jax.device_count(),
                        process_count=jax.process_count())
  init_source = init_checkpoint.prepare(config, workdir)  # read and checked unless resuming
  if t_cfg.eval_retrieval and t_cfg.eval_every_steps > 0:  # now, not at the first evaluation
    evaluate_lib.check_datasets(config)
  determinism.apply(t_cfg.deterministic)
  os.makedirs(workdir, exist_ok=True)
  workdir_lock.acquire(workdir)   # One run per workdir: a busy one stops here, naming its holder.
  is_primary = jax.process_index() == 0
  mesh = shd.make_mesh(config.mesh)
  logging.info('Mesh %s over %d devices (%d processes).', dict(mesh.shape), jax.device_count(),
               jax.process_count())
  per_host_batch = t_cfg.global_batch_size // jax.process_count()

  data = inputs.open_data(config)
  if config.head.num_classes != data.num_classes:
    logging.info('config.head.num_classes %d -> %d (from the dataset).', config.head.num_classes,
                 data.num_classes)
  setup = state_lib.make_setup(config, mesh, data.num_classes)
  config = setup.config
  t_cfg = config.train
  steps_per_epoch = schedule.steps_per_epoch(data.num_train_examples, t_cfg.global_batch_size)
  total_steps = schedule.num_train_steps(t_cfg, data.num_train_examples)
  lr_fn = schedule.create_learning_rate_fn(t_cfg, steps_per_epoch, total_steps)

  manager = checkpointing.make_manager(workdir, keep=t_cfg.keep_checkpoints,
                                       async_save=t_cfg.async_checkpointing)
  config_json = json.loads(config.to_json_best_effort())
  manifest_extra: dict[str, Any] = {}
  iterator = inputs.train_iterator(config, data, per_host_batch=per_host_batch)
  target, state_sh = state_lib.abstract_train_state(setup)

  def check_resume(record):
    changes = resume_check.check(
        record.get('config') or {}, config_json,
        allow_recipe_change=t_cfg.allow_recipe_change_on_resume,
        where=f'checkpoint step {record.get("step")} in {checkpointing.checkpoint_dir(workdir)}')
    manifest_extra['config_changes'] = changes
    if changes:
      logging.warning('Resuming with a changed recipe (allowed by '
                      'train.allow_recipe_change_on_resume): %s', changes)

  restored = checkpointing.restore_verified(manager, target, mesh, check_record=check_resume)
  latest = None if restored is None else restored[0]
  manifest_extra['start'] = init_checkpoint.start_record(config, latest)
  if restored is None and t_cfg.init_checkpoint:  # a whole DOLG model, not the ImageNet backbone
    state, state_sh, manifest_extra['start'] = init_checkpoint.start(
        setup, init_source, jax.random.key(config.seed))
    manifest_extra['backbone'] = {'spec': t_cfg.backbone_init, 'source': None,
                                  'note': 'not used: train.init_checkpoint takes precedence'}
  elif restored is None:
    # Resolved (downloaded, verified) before anything is compiled.
    backbone = imagenet.resolve(t_cfg.backbone_init, cache_dir=t_cfg.backbone_cache_dir,
                                model=config.model, progress=is_primary)
    manifest_extra['backbone'] = backbone.record()
    logging.info('Backbone: %s', backbone.describe())
    state, state_sh = state_lib.create_train_state(setup, jax.random.key(config.seed))
    if backbone.path is not None:
      state = state_lib.load_backbone(state, state_sh, backbone.path)
      logging.info('Backbone initialised from %s.', backbone.path)
  else:
    manifest_extra['backbone'] = {'spec': t_cfg.backbone_init,
                                  'source': f'checkpoint of step {latest}',
                                  'note': 'resumed: the backbone init was not read'}
    _, state, iter_state, _ = restored
    iterator.set_state(iter_state)
    logging.info('Resumed from step %d of %s.', latest, checkpointing.checkpoint_dir(workdir))
  start_step = int(jax.device_get(state.step))

  jsonl = metric_logging.JsonlWriter(workdir, enabled=is_primary)
  jsonl.truncate_after(start_step)
  writer = metric_logging.create_writer(workdir, is_primary)
  if is_primary and start_step == 0:
    writer.write_hparams(config.to_dict())

  def write_manifest():
    """Once the first step has run: a start that fails earlier leaves no record of a run."""
    if is_primary:
      manifest_lib.write_manifest(workdir, manifest_lib.build_manifest(
          config, seeds={'seed': config.seed, 'data_seed': inputs.data_seed(config)},
          dataset=data.manifest, extra={'start_step': start_step, 'total_steps': total_steps,
                                        'steps_per_epoch': steps_per_epoch,
                                        'mesh': dict(mesh.shape), **manifest_extra}))

  train_step = step_lib.make_train_step(setup, state_sh)
  eval_step = None
  retrieval_evaluator = evaluate_lib.RunEvaluator(config)   # one compiled extractor per run
  progress = metric_logging.Progress(total_steps, start_step, t_cfg.global_batch_size)
  util = utilisation.Utilisation(workdir, t_cfg.profile_steps, t_cfg.global_batch_size, is_primary,
                                 config.compute_dtype)
  pending: list[Any] = []          # Device metrics of steps not yet fetched.
  fetched: list[dict] = []         # Host metrics since the last log line.
  first_fetched = start_step + 1
  last_saved = latest
  last_logged: dict[str, Any] = {}
  warned_no_validation = False

  def fetch():
    nonlocal pending
    new = jax.device_get(pending)
    _check_finite(new, first_fetched + len(fetched), workdir, last_saved, latest)
    fetched.extend(new)
    pending = []

  completed = preempted = False
  try:
    with preemption.PreemptionHandler(t_cfg.preemption_sync_every_steps) as preempt:
      step = start_step
      while step < total_steps:
        util.before_step(step)
        with util.step_region(step + 1):
          with util.region('input_wait'):
            batch = inputs.device_batch(mesh, next(iterator))
          state, metrics = train_step(state, batch, lr_fn(step))
        pending.append(metrics)
        step += 1
        util.after_step(step, metrics)
        if step == start_step + 1:  # Throughput/ETA exclude compilation.
          jax.block_until_ready(metrics)
          util.restart(step, utilisation.train_step_flops(train_step, state, batch, lr_fn(step)))
          progress.restart(step)
          write_manifest()
        stop = preempt.should_stop(step)
        do_ckpt = (step % t_cfg.checkpoint_every_steps == 0 or step == total_steps or stop)
        # No evaluation when preempted: the grace period is for the checkpoint.
        do_eval = t_cfg.eval_every_steps > 0 and not stop and (
            step % t_cfg.eval_every_steps == 0 or step == total_steps)
        # Evaluation results go into the step's metrics.jsonl line (every line has the step's
        # loss and learning rate).
        do_log = step % t_cfg.log_every_steps == 0 or step == total_steps or do_eval
        if do_log or do_ckpt:
          fetch()
        timing = progress.update(step) if do_log else {}  # Throughput without save/eval time.
        timing.update(util.fields(step, timing) if do_log else {})
        if do_ckpt:  # Before evaluating: a failing evaluation must not cost the checkpoint.
          with util.region('checkpoint'):
            iter_state = iterator.get_state()
            checkpointing.save(manager, step, state, iter_state, checkpointing.make_record(
                step, state, iter_state, mesh, config_json))
          last_saved = step
        val = {}
        if do_eval:
          util.begin('evaluation')
          if data.val_source is not None:
            if eval_step is None:
              eval_step = step_lib.make_eval_step(setup, state_sh)
            batches = inputs.eval_batches(config, data, per_host_batch)
            val = evaluate(eval_step, state, batches, mesh, t_cfg.eval_batches)
          elif not warned_no_validation:
            logging.warning('config.data.dataset=%r has no validation split: no validation '
                            'accuracy is logged.', config.data.dataset)
            warned_no_validation = True
          if t_cfg.eval_retrieval:
            val.update(retrieval_eval(retrieval_evaluator, state, workdir, step))
          eval_time = util.end('evaluation')
          progress.exclude(eval_time)
          if val:
            val['eval_time_s'] = eval_time
        if do_log:
          record = {'step': step, 'epoch': step / steps_per_epoch, **_mean_metrics(fetched),
                    **timing, **val}
          fetched, first_fetched = [], step + 1
          writer.write_scalars(step, {k: v for k, v in record.items() if k != 'step'})
          jsonl.write(record)
          last_logged = record
          if is_primary:
            print(progress.line(step, record), flush=True)
        if stop:
          logging.warning('SIGTERM: saved step %d, exiting.', step)
          print(f'Preempted: checkpoint of step {step} saved in '
                f'{checkpointing.checkpoint_dir(workdir)}; rerun the same command to resume.',
                flush=True)
          preempted = True
          break
    completed = True
  finally:
    util.close()   # Stops a profiler trace still open (a run that ended inside its window).
    # Pending async saves complete (also when stopping on a NaN loss: they hold good states).
    try:
      checkpointing.finish(manager)
    except checkpointing.CheckpointWriteError as e:
      if completed:
        raise
      logging.error('Also: %s', e)   # Secondary to the error already propagating.
    finally:
      manager.close()
      if hasattr(iterator, 'close'):
        iterator.close()
      writer.flush()
      writer.close()
  if preempted:   # dolg_jax.main exits with failures.EXIT_PREEMPTED.
    return {**last_logged, 'preempted': True}
  return last_logged
