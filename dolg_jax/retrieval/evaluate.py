"""The evaluation library: called by `python -m dolg_jax.eval`, the training loop and the demo.

  apply_fn, variables, source = load_model(config, workdir=... | checkpoint=...)
  out = evaluate_variables(config, apply_fn, variables, output_dir, source=...)

Every dataset of `config.eval.datasets` prepared under `config.eval.data_dir` (revisitop ones, with
`config.eval.distractors` when `use_distractors`; `gldv2_retrieval`) is extracted (descriptors
cached in OUTPUT_DIR/cache with eval.cache), ranked and scored (dolg_jax.retrieval.scoring); writes
OUTPUT_DIR/results.json and, for revisitop datasets with `eval.report_queries` > 0,
report_<dataset>.html + .png (process 0 writes). Datasets not
prepared raise NotPreparedError (`check_datasets`) first. `load_model` reads our checkpoints and
released/converted weights, with the evaluation-time model overrides (`model_overrides`).
Design notes: docs/design_notes.md.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional

import jax
import ml_collections

from dolg_jax import atomic
from dolg_jax import models
from dolg_jax import profiling
from dolg_jax.data import gldv2_retrieval
from dolg_jax.data import revisitop
from dolg_jax.retrieval import descriptor_cache
from dolg_jax.retrieval import extract as extract_lib
from dolg_jax.retrieval import report
from dolg_jax.retrieval import scoring
from dolg_jax.weights import checkpoint as ckpt_lib
from dolg_jax.weights import converted
from dolg_jax.weights import released


# config.eval fields that override attributes of the DOLG module at evaluation (same names).
MODEL_OVERRIDES = models.EVAL_FIELDS


def model_overrides(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{field: value} of the evaluation-time model overrides that are on (0 / False = off)."""
  return {f: config.eval[f] for f in MODEL_OVERRIDES if config.eval[f]}


def with_overrides(model: models.DOLG, config: ml_collections.ConfigDict) -> models.DOLG:
  """`model` with the overrides of `model_overrides(config)`, checked."""
  overrides = model_overrides(config)
  if not overrides:
    return model
  out = model.clone(**overrides)
  try:
    out.check()
  except ValueError as err:
    raise ValueError(f'config.eval overrides {overrides} do not fit this model: {err}') from None
  return out


def model_apply_fn(model) -> Callable:
  """The extraction apply function of a DOLG module: (variables, images, valid_hw=None) -> desc.

  The module is its attribute `model` (for inspection).
  """

  def apply_fn(v, images, valid_hw=None):
    return model.apply(v, images, train=False, valid_hw=valid_hw)

  apply_fn.model = model
  return apply_fn


def eval_dtype(config: ml_collections.ConfigDict) -> str:
  """The extraction compute dtype: config.eval.compute_dtype, else config.compute_dtype."""
  return config.eval.compute_dtype or config.compute_dtype


def make_apply_fn(config: ml_collections.ConfigDict) -> Callable:
  """`model_apply_fn` of the model `config.model` describes, in the eval compute dtype, with the
  evaluation-time model overrides."""
  return model_apply_fn(
    with_overrides(models.build_model(config.model, dtype=eval_dtype(config)), config)
  )


def _is_released(path: str) -> bool:
  return os.path.isfile(path) or converted.is_converted_dir(path)


def load_model(
  config: ml_collections.ConfigDict,
  *,
  workdir: Optional[str] = None,
  checkpoint: Optional[str] = None,
) -> tuple[Callable, Any, str]:
  """(apply_fn, variables, source description) from a workdir or a checkpoint path."""
  if bool(workdir) == bool(checkpoint):
    raise ValueError('give exactly one of --workdir and --checkpoint')
  path = os.fspath(workdir or checkpoint)
  if not os.path.exists(path):
    raise FileNotFoundError(
      f'{path} does not exist: pass a training workdir (--workdir) or a '
      'released .pyth/.pth, converted directory or step directory '
      '(--checkpoint)'
    )
  if checkpoint and _is_released(path):
    model, variables = released.load(path, dtype=eval_dtype(config))
    return (
      model_apply_fn(with_overrides(model, config)),
      variables,
      f'released:{os.path.abspath(path)}',
    )
  variables = ckpt_lib.load_variables(path)
  return make_apply_fn(config), variables, f'ours:{os.path.abspath(path)}'


def output_dir_for(
  config: ml_collections.ConfigDict,
  workdir: Optional[str],
  checkpoint: Optional[str],
  output_dir: Optional[str] = None,
) -> str:
  """The explicit `output_dir`, else config.eval.output_dir, else WORKDIR/eval or <ckpt>_eval."""
  if output_dir or config.eval.output_dir:
    return output_dir or config.eval.output_dir
  if workdir:
    return os.path.join(workdir, 'eval')
  return os.path.abspath(checkpoint).rstrip('/') + '_eval'


def check_datasets(config: ml_collections.ConfigDict) -> None:
  """NotPreparedError naming every dataset of config.eval (and its distractors) not prepared
  under config.eval.data_dir, with the commands that prepare them."""
  e = config.eval
  data_dir = os.path.expanduser(e.data_dir)
  needed = [n for n in e.datasets if n != scoring.GLDV2]
  needed += [e.distractors] if e.use_distractors and needed else []
  messages = []
  try:
    revisitop.require_prepared(needed, data_dir)
  except revisitop.NotPreparedError as error:
    messages.append(str(error))
  if scoring.GLDV2 in e.datasets:
    try:
      gldv2_retrieval.require_prepared(data_dir)
    except gldv2_retrieval.NotPreparedError as error:
      messages.append(str(error))
  if messages:
    raise revisitop.NotPreparedError(
      '; '.join(messages) + ' (or set --config.eval.data_dir to the TFDS data dir holding them)'
    )


class RunEvaluator:
  """`evaluate_variables` for every evaluation of one training run, with ONE extractor: the
  forward passes compiled by the first evaluation are reused by the next ones (new weights, same
  shapes), so the k-th in-training evaluation compiles nothing."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.apply_fn = make_apply_fn(config)
    self.extractor: Optional[extract_lib.Extractor] = None

  def __call__(self, variables: Any, output_dir: str, *, source: str = '') -> dict:
    if self.extractor is None:
      self.extractor = extract_lib.Extractor(
        self.apply_fn, variables, extract_lib.from_config(self.config.eval)
      )
    else:
      self.extractor.set_variables(variables)
    return evaluate_variables(
      self.config, self.apply_fn, variables, output_dir, source=source, extractor=self.extractor
    )


def evaluate_variables(
  config: ml_collections.ConfigDict,
  apply_fn: Callable,
  variables: Any,
  output_dir: str,
  *,
  source: str = '',
  extractor: Optional[extract_lib.Extractor] = None,
) -> dict:
  """Evaluates (apply_fn, variables) on config.eval.datasets; writes results.json and reports.

  `apply_fn` must be the model with `model_overrides(config)` applied (`make_apply_fn`,
  `load_model`): the overrides name the cached descriptors. `extractor`: one already holding
  `variables` and built for this config (`RunEvaluator`); by default a new one.
  """
  e = config.eval
  scoring.check_config(config)
  data_dir = os.path.expanduser(e.data_dir)
  check_datasets(config)
  cfg = extract_lib.from_config(e)
  profile = profiling.Window(
    os.path.join(output_dir, 'profile'), *e.profile_batches, enabled=jax.process_index() == 0
  )
  if extractor is None:
    extractor = extract_lib.Extractor(apply_fn, variables, cfg, profile=profile)
  else:
    extractor.profile = profile
  overrides = model_overrides(config)
  # The cache key names the weights, the dtype the descriptors were computed in and the overrides.
  model_key = descriptor_cache.model_key(variables, eval_dtype(config), overrides)
  cache_dir = os.path.join(output_dir, 'cache') if e.cache else None
  search_cfg = scoring.search_settings(e)
  t_start = time.perf_counter()
  distractors = None
  if e.use_distractors and any(n != scoring.GLDV2 for n in e.datasets):
    distractors = descriptor_cache.split_descriptors(
      extractor,
      e.distractors,
      data_dir,
      'index',
      cache_dir=cache_dir,
      model_key=model_key,
      use_crop=False,
    )
  results, reports = {}, {}
  for name in e.datasets:
    if name == scoring.GLDV2:
      q, q_ids = descriptor_cache.gldv2_split_descriptors(
        extractor, data_dir, 'test', cache_dir=cache_dir, model_key=model_key
      )
      x, x_ids = descriptor_cache.gldv2_split_descriptors(
        extractor, data_dir, 'index', cache_dir=cache_dir, model_key=model_key
      )
      public, private, _ = gldv2_retrieval.load_solution(data_dir)
      results[name] = scoring.score_gldv2(q, q_ids, x, x_ids, public, private, e)
      continue
    gnd_cfg = revisitop.load_gnd(name, data_dir)
    db = descriptor_cache.split_descriptors(
      extractor, name, data_dir, 'index', cache_dir=cache_dir, model_key=model_key, use_crop=False
    )
    q = descriptor_cache.split_descriptors(
      extractor, name, data_dir, 'query', cache_dir=cache_dir, model_key=model_key, use_crop=True
    )
    res = scoring.score_dataset(q, db, gnd_cfg['gnd'], e, distractors)
    topk = res.pop('topk')
    results[name] = res
    if int(e.report_queries) > 0 and jax.process_index() == 0:
      reports[name] = report.write_dataset_report(
        output_dir,
        name,
        data_dir,
        gnd_cfg,
        topk,
        res['base'],
        int(e.report_queries),
        cfg.crop_rounding,
        search_cfg,
      )
  profile.stop()  # A window longer than the batches run ends here.
  out = {
    'source': source,
    'model_hash': model_key,
    'model_overrides': overrides,
    'extraction': cfg.key(),
    'search': search_cfg,
    'use_distractors': bool(e.use_distractors),
    'results': results,
    'compile_count': extractor.compile_count,
    'reports': {k: list(v) for k, v in reports.items()},
    'seconds': time.perf_counter() - t_start,
  }
  if jax.process_index() == 0:
    os.makedirs(output_dir, exist_ok=True)
    atomic.write_json(os.path.join(output_dir, 'results.json'), out, indent=1)
  out['table'] = scoring.format_table(results, search_cfg)
  if overrides or cfg.scale_pool != 'mean':  # SuperGlobal's extraction modules: say they are on
    out['table'] += (
      '\nextraction: scale_pool='
      + cfg.scale_pool
      + ''.join(f', {k}={v}' for k, v in overrides.items())
    )
  out['output_dir'] = output_dir
  return out


def run(
  config: ml_collections.ConfigDict,
  *,
  workdir: Optional[str] = None,
  checkpoint: Optional[str] = None,
  output_dir: Optional[str] = None,
) -> dict:
  """Loads the model (workdir or checkpoint) and evaluates it; see `evaluate_variables`."""
  check_datasets(config)  # before loading the model
  apply_fn, variables, source = load_model(config, workdir=workdir, checkpoint=checkpoint)
  return evaluate_variables(
    config,
    apply_fn,
    variables,
    output_dir_for(config, workdir, checkpoint, output_dir),
    source=source,
  )
