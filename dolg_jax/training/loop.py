"""`train_and_evaluate(config, workdir)`: the training loop.

Trains from the newest verified checkpoint of `workdir` (else train.init_checkpoint, else the
ImageNet backbone) and returns the last logged metrics (+ 'preempted': True after a SIGTERM's
checkpoint). Writes metrics.jsonl, TensorBoard events, manifest.json and checkpoints under
`workdir`. A checkpoint is written only after every loss since the previous check was verified
finite, so a NaN/inf stops the run (NonFiniteLossError) with the last good checkpoint intact.
Its phases, in order: `_open_run`, `_initial_state`, `_Records` / `_write_manifest`,
`_Evaluations`, `_train_steps`, `_close_run`. Design notes: docs/design_notes.md.
"""

import dataclasses
import json
import os
from typing import Any, Callable

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


def _check_finite(
  records: list[dict[str, Any]],
  first_step: int,
  workdir: str,
  last_saved: int | None,
  restored: int | None = None,
) -> None:
  """Raises NonFiniteLossError at the first step whose loss, gradient, parameters or BatchNorm
  statistics / CurricularFace t are not finite; the message names the last good checkpoint and,
  when nothing was saved since the state was restored (`restored` = its step), points at the
  data rather than the learning rate."""
  for i, r in enumerate(records):
    if (
      not all(np.isfinite(r[k]) for k in ('loss', 'grad_norm', 'param_norm'))
      or r['nonfinite_state'] != 0
    ):
      where = (
        f'step {last_saved} in {checkpointing.checkpoint_dir(workdir)}'
        if last_saved is not None
        else 'none yet'
      )
      head = (
        f'Non-finite training values at step {first_step + i}: loss {r["loss"]}, grad_norm '
        f'{r["grad_norm"]}, param_norm {r["param_norm"]}, non-finite BatchNorm '
        f'statistics {int(r["nonfinite_state"])}. Stopping without saving this '
        f'state; last good checkpoint: {where}.'
      )
      if restored is not None and last_saved == restored:
        raise NonFiniteLossError(
          f'{head} This is within {first_step + i - restored} step(s) of resuming from step '
          f'{restored}, whose contents verified against their checksums: check the input data '
          '(python -m dolg_jax.data.prepare --verify) and what differs from the original run '
          '(config, code version, devices; see manifest.json) before rerunning.'
        )
      raise NonFiniteLossError(
        f'{head} Lower config.train.base_learning_rate or check the input data, then rerun '
        'the same command to resume from that checkpoint.'
      )


def _mean_metrics(records: list[dict[str, Any]]) -> dict[str, float]:
  return {k: float(np.mean([r[k] for r in records])) for k in records[0]}


def evaluate(eval_step, state, batches, mesh) -> dict[str, float]:
  """Validation loss and top-1 accuracy (nearest class centre) over `batches` (every process
  yields the same number, so all stop together). The sums stay on the device: one host fetch
  per evaluation, not one per batch."""
  sums = None
  for batch in batches:
    out = eval_step(state, shd.global_batch(mesh, batch))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  totals = (
    {'correct': 0.0, 'count': 0.0, 'loss_sum': 0.0}
    if sums is None
    else {k: float(v) for k, v in jax.device_get(sums).items()}
  )
  n = max(totals['count'], 1.0)
  return {
    'val_accuracy': totals['correct'] / n,
    'val_loss': totals['loss_sum'] / n,
    'val_examples': totals['count'],
  }


def retrieval_eval(evaluator: evaluate_lib.RunEvaluator, state, workdir: str, step: int) -> dict:
  """Retrieval mAP of the current weights (config.eval datasets), through the evaluation library
  (`evaluator`: the run's one, whose compiled extractor every evaluation reuses)."""
  variables = shd.host_replicated(
    {'params': state.params['model'], 'batch_stats': state.batch_stats}
  )
  out = evaluator(
    variables, os.path.join(workdir, 'eval', f'step_{step}'), source=f'train:{workdir}@{step}'
  )
  return scoring.flat_maps(out['results'])


# --------------------------------------------------------------------------- phase 1: the run
@dataclasses.dataclass
class _Run:
  """What a run is, fixed before its first step (`_open_run`)."""

  config: ml_collections.ConfigDict  # with head.num_classes from the dataset
  workdir: str
  mesh: jax.sharding.Mesh
  data: inputs.Data
  setup: state_lib.TrainSetup
  init_source: init_checkpoint.Source | None
  per_host_batch: int
  steps_per_epoch: int
  total_steps: int
  lr_fn: Callable[[Any], np.ndarray]
  config_json: dict
  manager: checkpointing.Manager
  iterator: Any  # this process's training batches
  is_primary: bool


def _open_run(config: ml_collections.ConfigDict, workdir: str) -> _Run:
  """Checks the config, takes the workdir's lock, opens the data, the model setup, the schedule,
  the checkpoint manager and the input iterator. A bad field, a busy workdir or a missing dataset
  stops here, before anything but the lock file is written."""
  t_cfg = config.train
  config_check.validate(config, device_count=jax.device_count(), process_count=jax.process_count())
  init_source = init_checkpoint.prepare(config, workdir)  # read and checked unless resuming
  if t_cfg.eval_retrieval and t_cfg.eval_every_steps > 0:  # now, not at the first evaluation
    evaluate_lib.check_datasets(config)
  determinism.apply(t_cfg.deterministic)
  os.makedirs(workdir, exist_ok=True)
  workdir_lock.acquire(workdir)  # One run per workdir: a busy one stops here, naming its holder.
  mesh = shd.make_mesh(config.mesh)
  logging.info(
    'Mesh %s over %d devices (%d processes).',
    dict(mesh.shape),
    jax.device_count(),
    jax.process_count(),
  )
  per_host_batch = t_cfg.global_batch_size // jax.process_count()
  data = inputs.open_data(config)
  if config.head.num_classes != data.num_classes:
    logging.info(
      'config.head.num_classes %d -> %d (from the dataset).',
      config.head.num_classes,
      data.num_classes,
    )
  setup = state_lib.make_setup(config, mesh, data.num_classes)
  config = setup.config
  steps_per_epoch = schedule.steps_per_epoch(data.num_train_examples, t_cfg.global_batch_size)
  total_steps = schedule.num_train_steps(config.train, data.num_train_examples)
  return _Run(
    config=config,
    workdir=workdir,
    mesh=mesh,
    data=data,
    setup=setup,
    init_source=init_source,
    per_host_batch=per_host_batch,
    steps_per_epoch=steps_per_epoch,
    total_steps=total_steps,
    lr_fn=schedule.create_learning_rate_fn(config.train, steps_per_epoch, total_steps),
    config_json=json.loads(config.to_json_best_effort()),
    manager=checkpointing.make_manager(
      workdir, keep=t_cfg.keep_checkpoints, async_save=t_cfg.async_checkpointing
    ),
    iterator=inputs.train_iterator(config, data, per_host_batch=per_host_batch),
    is_primary=jax.process_index() == 0,
  )


# --------------------------------------------------------------------------- phase 2: the state
@dataclasses.dataclass
class _Start:
  """Where training starts: the state and its sharding, the verified checkpoint it was restored
  from (None for a fresh start), the step it is at and what the manifest records about it."""

  state: state_lib.TrainState
  state_sh: state_lib.TrainState  # the state's shardings
  restored_step: int | None
  manifest: dict
  step: int = 0


def _initial_state(run: _Run) -> _Start:
  """The newest checkpoint that verifies (its recipe checked against the config; its input
  position restored into the iterator); else train.init_checkpoint (a whole DOLG model); else a
  new state with the ImageNet backbone (downloaded and verified before anything is compiled)."""
  t_cfg = run.config.train
  target, state_sh = state_lib.abstract_train_state(run.setup)
  extra: dict[str, Any] = {}

  def check_resume(record):
    changes = resume_check.check(
      record.get('config') or {},
      run.config_json,
      allow_recipe_change=t_cfg.allow_recipe_change_on_resume,
      where=f'checkpoint step {record.get("step")} in {checkpointing.checkpoint_dir(run.workdir)}',
    )
    extra['config_changes'] = changes
    if changes:
      logging.warning(
        'Resuming with a changed recipe (allowed by train.allow_recipe_change_on_resume): %s',
        changes,
      )

  restored = checkpointing.restore_verified(
    run.manager, target, run.mesh, check_record=check_resume
  )
  latest = None if restored is None else restored[0]
  extra['start'] = init_checkpoint.start_record(run.config, latest)
  if restored is not None:
    extra['backbone'] = {
      'spec': t_cfg.backbone_init,
      'source': f'checkpoint of step {latest}',
      'note': 'resumed: the backbone init was not read',
    }
    _, state, iter_state, _ = restored
    run.iterator.set_state(iter_state)
    logging.info('Resumed from step %d of %s.', latest, checkpointing.checkpoint_dir(run.workdir))
  elif t_cfg.init_checkpoint:
    state, state_sh, extra['start'] = init_checkpoint.start(
      run.setup, run.init_source, jax.random.key(run.config.seed)
    )
    extra['backbone'] = {
      'spec': t_cfg.backbone_init,
      'source': None,
      'note': 'not used: train.init_checkpoint takes precedence',
    }
  else:
    backbone = imagenet.resolve(
      t_cfg.backbone_init,
      cache_dir=t_cfg.backbone_cache_dir,
      model=run.config.model,
      progress=run.is_primary,
    )
    extra['backbone'] = backbone.record()
    logging.info('Backbone: %s', backbone.describe())
    state, state_sh = state_lib.create_train_state(run.setup, jax.random.key(run.config.seed))
    if backbone.path is not None:
      state = state_lib.load_backbone(state, state_sh, backbone.path)
      logging.info('Backbone initialised from %s.', backbone.path)
  return _Start(state, state_sh, latest, extra, step=int(jax.device_get(state.step)))


# --------------------------------------------------------------------------- phase 3: outputs
class _Records:
  """The step metrics' way from the device to the outputs: device metrics wait in `pending` until a
  log / checkpoint / evaluation boundary fetches them (checked finite there, so that a non-finite
  state is never checkpointed), then one line per logged step goes to metrics.jsonl, TensorBoard
  and stdout (process 0 only)."""

  def __init__(self, run: _Run, start: _Start):
    start_step = start.step
    self.workdir, self.steps_per_epoch = run.workdir, run.steps_per_epoch
    self.is_primary = run.is_primary
    self.restored_step = start.restored_step
    self.last_saved = start.restored_step
    self.jsonl = metric_logging.JsonlWriter(run.workdir, enabled=run.is_primary)
    self.jsonl.truncate_after(start_step)
    self.writer = metric_logging.create_writer(run.workdir, run.is_primary)
    if run.is_primary and start_step == 0:
      self.writer.write_hparams(run.config.to_dict())
    self.pending: list[dict[str, jax.Array]] = []  # device metrics of steps not yet fetched
    self.fetched: list[dict] = []  # host metrics since the last log line
    self.first_fetched = start_step + 1
    self.last_logged: dict[str, Any] = {}

  def add(self, metrics: dict[str, jax.Array]) -> None:
    """Queues the device metrics of the step just run (fetched at the next boundary)."""
    self.pending.append(metrics)

  def saved(self, step: int) -> None:
    """A checkpoint of `step` was requested: a later non-finite loss names it."""
    self.last_saved = step

  def fetch(self) -> None:
    new = jax.device_get(self.pending)
    _check_finite(
      new, self.first_fetched + len(self.fetched), self.workdir, self.last_saved, self.restored_step
    )
    self.fetched.extend(new)
    self.pending = []

  def log(self, step: int, progress: metric_logging.Progress, extra: dict[str, Any]) -> None:
    record = {
      'step': step,
      'epoch': step / self.steps_per_epoch,
      **_mean_metrics(self.fetched),
      **extra,
    }
    self.fetched, self.first_fetched = [], step + 1
    self.writer.write_scalars(step, {k: v for k, v in record.items() if k != 'step'})
    self.jsonl.write(record)
    self.last_logged = record
    if self.is_primary:
      print(progress.line(record), flush=True)

  def close(self) -> None:
    self.writer.flush()
    self.writer.close()


def _write_manifest(run: _Run, start: _Start) -> None:
  """Once the first step has run: a start that fails earlier leaves no record of a run."""
  if run.is_primary:
    manifest_lib.write_manifest(
      run.workdir,
      manifest_lib.build_manifest(
        run.config,
        seeds={'seed': run.config.seed, 'data_seed': inputs.data_seed(run.config)},
        dataset=run.data.manifest,
        extra={
          'start_step': start.step,
          'total_steps': run.total_steps,
          'steps_per_epoch': run.steps_per_epoch,
          'mesh': dict(run.mesh.shape),
          **start.manifest,
        },
      ),
    )


# --------------------------------------------------------------------------- phase 4: evaluations
class _Evaluations:
  """The run's periodic evaluations, each compiled once and fed by one set of input workers:
  validation loss / accuracy (one eval step; `inputs.validation_passes`) and retrieval mAP (one
  `RunEvaluator`, config.train.eval_retrieval)."""

  def __init__(self, run: _Run, state_sh):
    self.run, self.state_sh = run, state_sh
    self.eval_step = None
    self.passes = None
    self.retrieval = evaluate_lib.RunEvaluator(run.config)
    self.warned_no_validation = False

  def __call__(self, state, step: int) -> dict[str, Any]:
    run = self.run
    val: dict[str, Any] = {}
    if run.data.val_source is not None:
      if self.eval_step is None:
        self.eval_step = step_lib.make_eval_step(run.setup, self.state_sh)
        self.passes = inputs.validation_passes(run.config, run.data, run.per_host_batch)
      val = evaluate(self.eval_step, state, self.passes.next_pass(), run.mesh)
    elif not self.warned_no_validation:
      logging.warning(
        'config.data.dataset=%r has no validation split: no validation accuracy is logged.',
        run.config.data.dataset,
      )
      self.warned_no_validation = True
    if run.config.train.eval_retrieval:
      val.update(retrieval_eval(self.retrieval, state, run.workdir, step))
    return val

  def close(self) -> None:
    if self.passes is not None:
      self.passes.close()


# --------------------------------------------------------------------------- phase 5: the steps
def _train_steps(
  run: _Run, start: _Start, records: _Records, util: utilisation.Utilisation
) -> bool:
  """Steps from the state's step to total_steps: checkpoints, evaluations and log lines at their
  boundaries. Returns True when SIGTERM stopped the run (its checkpoint saved)."""
  t_cfg = run.config.train
  state = start.state
  start_step = start.step
  train_step = step_lib.make_train_step(run.setup, start.state_sh)
  evaluations = _Evaluations(run, start.state_sh)
  progress = metric_logging.Progress(run.total_steps, start_step, t_cfg.global_batch_size)
  try:
    with preemption.PreemptionHandler(t_cfg.preemption_sync_every_steps) as preempt:
      step = start_step
      while step < run.total_steps:
        util.before_step(step)
        with util.step_region(step + 1):
          with util.region('input_wait'):
            batch = inputs.device_batch(run.mesh, next(run.iterator))
          state, metrics = train_step(state, batch, run.lr_fn(step))
        records.add(metrics)
        step += 1
        util.after_step(step, metrics)
        if step == start_step + 1:  # Throughput/ETA exclude compilation.
          jax.block_until_ready(metrics)
          util.restart(
            step, utilisation.train_step_flops(train_step, state, batch, run.lr_fn(step))
          )
          progress.restart(step)
          _write_manifest(run, start)
        stop = preempt.should_stop(step)
        last = step == run.total_steps
        do_ckpt = step % t_cfg.checkpoint_every_steps == 0 or last or stop
        # No evaluation when preempted: the grace period is for the checkpoint.
        do_eval = (
          t_cfg.eval_every_steps > 0 and not stop and (step % t_cfg.eval_every_steps == 0 or last)
        )
        # Evaluation results go into the step's metrics.jsonl line (every line has the step's
        # loss and learning rate).
        do_log = step % t_cfg.log_every_steps == 0 or last or do_eval
        if do_log or do_ckpt:
          records.fetch()
        timing = progress.update(step) if do_log else {}  # Throughput without save/eval time.
        timing.update(util.fields(step, timing) if do_log else {})
        if do_ckpt:  # Before evaluating: a failing evaluation must not cost the checkpoint.
          with util.region('checkpoint'):
            iter_state = run.iterator.get_state()
            checkpointing.save(
              run.manager,
              step,
              state,
              iter_state,
              checkpointing.make_record(step, state, iter_state, run.mesh, run.config_json),
            )
          records.saved(step)
        val = {}
        if do_eval:
          util.begin('evaluation')
          val = evaluations(state, step)
          eval_time = util.end('evaluation')
          progress.exclude(eval_time)
          if val:
            val['eval_time_s'] = eval_time
        if do_log:
          records.log(step, progress, {**timing, **val})
        if stop:
          logging.warning('SIGTERM: saved step %d, exiting.', step)
          print(
            f'Preempted: checkpoint of step {step} saved in '
            f'{checkpointing.checkpoint_dir(run.workdir)}; rerun the same command to resume.',
            flush=True,
          )
          return True
    return False
  finally:
    evaluations.close()


# --------------------------------------------------------------------------- phase 6: the end
def _close_run(
  run: _Run, records: _Records | None, util: utilisation.Utilisation | None, completed: bool
) -> None:
  """Stops an open profiler trace, waits for pending async saves (also after a non-finite stop:
  they hold good states; a failed one is raised only when nothing else is propagating), closes
  the checkpoint manager, the input workers and the metric writers."""
  if util is not None:
    util.close()
  try:
    checkpointing.finish(run.manager)
  except checkpointing.CheckpointWriteError as e:
    if completed:
      raise
    logging.error('Also: %s', e)  # Secondary to the error already propagating.
  finally:
    run.manager.close()
    if hasattr(run.iterator, 'close'):
      run.iterator.close()
    if records is not None:
      records.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds a checkpoint); returns the last logged metrics,
  plus 'preempted': True when SIGTERM stopped the run after saving its checkpoint."""
  run = _open_run(config, workdir)
  records = util = None
  completed = preempted = False
  try:
    start = _initial_state(run)
    records = _Records(run, start)
    util = utilisation.Utilisation(
      workdir,
      run.config.train.profile_steps,
      run.config.train.global_batch_size,
      run.is_primary,
      run.config.compute_dtype,
    )
    preempted = _train_steps(run, start, records, util)
    completed = True
  finally:
    _close_run(run, records, util, completed)
  if preempted:  # dolg_jax.main exits with failures.EXIT_PREEMPTED.
    return {**records.last_logged, 'preempted': True}
  return records.last_logged
