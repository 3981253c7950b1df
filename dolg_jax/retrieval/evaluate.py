"""The evaluation library: called by `python -m dolg_jax.eval`, the training loop and the demo.

  apply_fn, variables, source = load_model(config, workdir=... | checkpoint=...)
  out = evaluate_variables(config, apply_fn, variables, output_dir, source=...)

For every dataset of `config.eval.datasets` (prepared TFDS builders under `config.eval.data_dir`,
see dolg_jax.data.revisitop): extract multi-scale descriptors of the index and query splits (and of
`config.eval.distractors` when `use_distractors`), cached (dolg_jax.retrieval.descriptor_cache);
rank by dot product (optional DBA / alpha-QE) and score the Easy / Medium / Hard protocols (mAP and
mP@1,5,10) without and with the distractors (dolg_jax.retrieval.scoring); write
OUTPUT_DIR/results.json and a visual report (OUTPUT_DIR/report_<dataset>.html + .png).

`load_model` reads our training checkpoints (a workdir or a step directory, with the model `config`
describes) and released/converted weights (the architecture inferred from the file).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Optional

import jax
import ml_collections

from dolg_jax import models
from dolg_jax import profiling
from dolg_jax.data import revisitop
from dolg_jax.retrieval import descriptor_cache
from dolg_jax.retrieval import extract as extract_lib
from dolg_jax.retrieval import report
from dolg_jax.retrieval import scoring
from dolg_jax.weights import checkpoint as ckpt_lib
from dolg_jax.weights import converted
from dolg_jax.weights import released


def model_apply_fn(model) -> Callable:
  """The extraction apply function of a DOLG module: (variables, images, valid_hw=None) -> desc."""

  def apply_fn(v, images, valid_hw=None):
    return model.apply(v, images, train=False, valid_hw=valid_hw)

  return apply_fn


def eval_dtype(config: ml_collections.ConfigDict) -> str:
  """The extraction compute dtype: config.eval.compute_dtype, else config.compute_dtype."""
  return config.eval.compute_dtype or config.compute_dtype


def make_apply_fn(config: ml_collections.ConfigDict) -> Callable:
  """`model_apply_fn` of the model `config.model` describes, in the eval compute dtype."""
  return model_apply_fn(models.build_model(config.model, dtype=eval_dtype(config)))


def _is_released(path: str) -> bool:
  return os.path.isfile(path) or converted.is_converted_dir(path)


def load_model(config: ml_collections.ConfigDict, *, workdir: Optional[str] = None,
               checkpoint: Optional[str] = None) -> tuple[Callable, Any, str]:
  """(apply_fn, variables, source description) from a workdir or a checkpoint path."""
  if bool(workdir) == bool(checkpoint):
    raise ValueError('give exactly one of --workdir and --checkpoint')
  path = os.fspath(workdir or checkpoint)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist')
  if checkpoint and _is_released(path):
    model, variables = released.load(path, dtype=eval_dtype(config))
    return model_apply_fn(model), variables, f'released:{os.path.abspath(path)}'
  variables = ckpt_lib.load_variables(path)
  return make_apply_fn(config), variables, f'ours:{os.path.abspath(path)}'


def output_dir_for(config: ml_collections.ConfigDict, workdir: Optional[str],
                   checkpoint: Optional[str], output_dir: Optional[str] = None) -> str:
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
  needed = list(e.datasets) + ([e.distractors] if e.use_distractors else [])
  try:
    revisitop.require_prepared(needed, os.path.expanduser(e.data_dir))
  except revisitop.NotPreparedError as error:
    raise revisitop.NotPreparedError(
        f'{error} (or set --config.eval.data_dir to the TFDS data dir holding them)') from None


def evaluate_variables(config: ml_collections.ConfigDict, apply_fn: Callable, variables: Any,
                       output_dir: str, *, source: str = '') -> dict:
  """Evaluates (apply_fn, variables) on config.eval.datasets; writes results.json and reports."""
  e = config.eval
  data_dir = os.path.expanduser(e.data_dir)
  check_datasets(config)
  cfg = extract_lib.from_config(e)
  profile = profiling.Window(os.path.join(output_dir, 'profile'), *e.profile_batches,
                             enabled=jax.process_index() == 0)
  extractor = extract_lib.Extractor(apply_fn, variables, cfg, profile=profile)
  # The cache key names the weights and the dtype the descriptors were computed in.
  model_key = f'{descriptor_cache.variables_hash(variables)}-{eval_dtype(config)}'
  cache_dir = os.path.join(output_dir, 'cache') if e.cache else None
  t_start = time.perf_counter()
  distractors = None
  if e.use_distractors:
    distractors = descriptor_cache.split_descriptors(
        extractor, e.distractors, data_dir, 'index', cache_dir=cache_dir, model_key=model_key,
        use_crop=False)
  results, reports = {}, {}
  for name in e.datasets:
    gnd_cfg = revisitop.load_gnd(name, data_dir)
    db = descriptor_cache.split_descriptors(extractor, name, data_dir, 'index',
                                            cache_dir=cache_dir, model_key=model_key,
                                            use_crop=False)
    q = descriptor_cache.split_descriptors(extractor, name, data_dir, 'query',
                                           cache_dir=cache_dir, model_key=model_key,
                                           use_crop=True)
    res = scoring.score_dataset(q, db, gnd_cfg['gnd'], e, distractors)
    topk = res.pop('topk')
    results[name] = res
    if int(e.report_queries) > 0 and jax.process_index() == 0:
      reports[name] = report.write_dataset_report(output_dir, name, data_dir, gnd_cfg, topk,
                                                  res['base'], int(e.report_queries),
                                                  cfg.crop_rounding)
  profile.stop()   # A window longer than the batches run ends here.
  out = {'source': source, 'model_hash': model_key, 'extraction': cfg.key(),
         'search': {k: e[k] for k in ('qe_k', 'qe_alpha', 'dba_k', 'dba_alpha')},
         'use_distractors': bool(e.use_distractors), 'results': results,
         'compile_count': extractor.compile_count,
         'reports': {k: list(v) for k, v in reports.items()},
         'seconds': time.perf_counter() - t_start}
  if jax.process_index() == 0:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, 'results.json'), 'w') as f:
      json.dump(out, f, indent=1)
  out['table'] = scoring.format_table(results)
  out['output_dir'] = output_dir
  return out


def run(config: ml_collections.ConfigDict, *, workdir: Optional[str] = None,
        checkpoint: Optional[str] = None, output_dir: Optional[str] = None) -> dict:
  """Loads the model (workdir or checkpoint) and evaluates it; see `evaluate_variables`."""
  check_datasets(config)  # before loading the model
  apply_fn, variables, source = load_model(config, workdir=workdir, checkpoint=checkpoint)
  return evaluate_variables(config, apply_fn, variables,
                            output_dir_for(config, workdir, checkpoint, output_dir), source=source)
