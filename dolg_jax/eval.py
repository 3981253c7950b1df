"""Revisited Oxford / Paris (+1M) evaluation: python -m dolg_jax.eval.

  python -m dolg_jax.eval --config=configs/r50.py --workdir=DIR          # our latest checkpoint
  python -m dolg_jax.eval --config=configs/r50.py --checkpoint=PATH      # .pyth/.pth, converted
                                                                         # dir, or a step dir
  [--output_dir=DIR] [--config.eval.use_distractors=True] [--config.eval.qe_k=2] ...

Steps: load the model and variables; for every dataset of `config.eval.datasets` (prepared TFDS
builders under `config.eval.data_dir`, see dolg_jax.data.revisitop) extract multi-scale descriptors
of the index and query splits (and of `config.eval.distractors` when `use_distractors`); rank
by dot product (optional DBA / alpha-QE); score the Easy / Medium / Hard protocols (mAP and
mP@1,5,10) without and with the distractors (+1M through the exact fast path of
dolg_jax.retrieval.search). Prints the table, writes OUTPUT_DIR/results.json and a visual report
(OUTPUT_DIR/report_<dataset>.html + .png).

Descriptors are cached in OUTPUT_DIR/cache/ under a key made of the variables' content hash, the
extraction settings and the dataset, so re-running with other search settings (QE, DBA,
distractors on/off) takes seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any, Callable, Mapping, Optional

import jax
import ml_collections
import numpy as np

from dolg_jax.data import revisitop
from dolg_jax.retrieval import extract as extract_lib
from dolg_jax.retrieval import metrics, report, search

KAPPAS = (1, 5, 10)


# ----------------------------------------------------------------------------- model loading


def _is_released(path: str) -> bool:
  if os.path.isfile(path):
    return True  # .pyth / .pth / raw torch state dict
  from dolg_jax import pretrained  # pylint: disable=g-import-not-at-top
  return pretrained.is_converted_dir(path)


def model_apply_fn(model) -> Callable:
  """The extraction apply function of a DOLG module: (variables, images, valid_hw=None) -> desc."""

  def apply_fn(v, images, valid_hw=None):
    return model.apply(v, images, train=False, valid_hw=valid_hw)

  return apply_fn


def eval_dtype(config: ml_collections.ConfigDict) -> str:
  """The extraction compute dtype: config.eval.compute_dtype, else config.compute_dtype."""
  return config.eval.get('compute_dtype', '') or config.get('compute_dtype', 'float32')


def make_apply_fn(config: ml_collections.ConfigDict) -> Callable:
  """`model_apply_fn` of the model `config.model` describes, in the eval compute dtype."""
  from dolg_jax import models  # pylint: disable=g-import-not-at-top
  return model_apply_fn(models.build_model(config.model, dtype=eval_dtype(config)))


def load_model(config: ml_collections.ConfigDict, *, workdir: Optional[str] = None,
               checkpoint: Optional[str] = None) -> tuple[Callable, Any, str]:
  """(apply_fn, variables, source description) from --workdir or --checkpoint."""
  if bool(workdir) == bool(checkpoint):
    raise ValueError('give exactly one of --workdir and --checkpoint')
  path = os.fspath(workdir or checkpoint)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist')
  if checkpoint and _is_released(path):
    from dolg_jax import pretrained  # pylint: disable=g-import-not-at-top
    model, variables = pretrained.load(path, dtype=eval_dtype(config))
    return model_apply_fn(model), variables, f'released:{os.path.abspath(path)}'
  from dolg_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  variables = checkpointing.load_variables(path)
  return make_apply_fn(config), variables, f'ours:{os.path.abspath(path)}'


def variables_hash(variables: Any) -> str:
  """Content hash of a variables tree (names, shapes, dtypes and bytes)."""
  h = hashlib.sha1()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(variables)[0],
                           key=lambda kv: jax.tree_util.keystr(kv[0])):
    a = np.asarray(leaf)
    h.update(jax.tree_util.keystr(path).encode())
    h.update(str((a.shape, a.dtype.str)).encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- descriptors


def _cache_path(cache_dir: str, key: Mapping[str, Any]) -> str:
  digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
  return os.path.join(cache_dir, f'{key["dataset"]}_{key["split"]}_{digest}.npy')


def split_descriptors(extractor: extract_lib.Extractor, name: str, data_dir: str, split: str,
                      *, cache_dir: Optional[str], model_key: str, use_crop: bool) -> np.ndarray:
  """(n, D) descriptors of one split, from the cache when present."""
  key = {'dataset': name, 'split': split, 'model': model_key, 'crop': use_crop,
         'extract': extractor.cfg.key()}
  path = _cache_path(cache_dir, key) if cache_dir else None
  if path and os.path.exists(path):
    logging.info('descriptors from cache %s', path)
    return np.load(path)
  src = revisitop.data_source(name, data_dir, split)
  n = len(src)

  def examples():
    for ex in revisitop.iter_examples(src):
      out = {'index': int(ex['index']), 'image': ex['image']}
      if use_crop:
        out['bbx'] = np.asarray(ex['bbx'], np.float64)
      yield out

  t0 = time.perf_counter()
  num = int(revisitop.load_summary(name, data_dir)[f'num_{split}'])  # list length
  desc = extractor.extract(examples(), num)
  logging.info('%s/%s: %d images in %.1fs', name, split, n, time.perf_counter() - t0)
  if path and jax.process_index() == 0:
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + '.tmp.npy'
    np.save(tmp, desc)
    os.replace(tmp, path)
    with open(path[:-4] + '.json', 'w') as f:
      json.dump(key, f, indent=1)
  return desc


# ----------------------------------------------------------------------------- scoring


def _table_entry(res: Mapping[str, dict]) -> dict:
  out = {}
  for p in metrics.PROTOCOLS:
    r = res[p]
    out[p] = {'map': float(r['map']), **{f'mp@{k}': float(v) for k, v in zip(r['kappas'], r['mp'])},
              'aps': [None if np.isnan(a) else float(a) for a in r['aps']]}
  return out


def score_dataset(q: np.ndarray, db: np.ndarray, gnd: list, cfg: ml_collections.ConfigDict,
                  distractors: Optional[np.ndarray] = None) -> dict:
  """{'base': table, '+1m': table (when distractors), 'topk': (scores, idx) on the base set}."""
  e = cfg
  chunk = int(e.get('search_chunk_size', 65536))
  if int(e.get('dba_k', 0)) > 0:
    db = search.database_augmentation(db, int(e.dba_k), float(e.dba_alpha), chunk)
  q_base = q
  if int(e.get('qe_k', 0)) > 0:
    q_base = search.alpha_query_expansion(q, db, int(e.qe_k), float(e.qe_alpha), chunk)
  scores = search.similarity_matrix(q_base, db, chunk)
  ranks = search.full_ranks(scores)
  out = {'base': _table_entry(metrics.compute_protocols(ranks, gnd, KAPPAS)),
         'topk': (np.take_along_axis(scores, ranks[:10].T, 1), ranks[:10].T)}
  if distractors is not None:
    segs = [db, distractors]
    q_1m = q
    if int(e.get('qe_k', 0)) > 0:
      q_1m = search.alpha_query_expansion(q, segs, int(e.qe_k), float(e.qe_alpha), chunk)
    out['+1m'] = _table_entry(search.fast_compute_protocols(q_1m, segs, gnd, KAPPAS,
                                                            chunk_size=chunk))
  return out


def format_table(results: Mapping[str, dict]) -> str:
  """Per dataset and setting: E/M/H mAP and mP@1,5,10 (percent)."""
  head = (f'{"dataset":<18}' + ''.join(f'{p[0].upper() + " mAP":>8}' for p in metrics.PROTOCOLS)
          + ''.join(f'{p[0].upper() + "@" + str(k):>7}' for p in metrics.PROTOCOLS for k in KAPPAS))
  lines = [head, '-' * len(head)]
  for name, res in results.items():
    for setting in ('base', '+1m'):
      if setting not in res:
        continue
      t = res[setting]
      label = name + ('+1M' if setting == '+1m' else '')
      lines.append(f'{label:<18}' + ''.join(f'{100 * t[p]["map"]:8.2f}' for p in metrics.PROTOCOLS)
                   + ''.join(f'{100 * t[p][f"mp@{k}"]:7.2f}' for p in metrics.PROTOCOLS
                             for k in KAPPAS))
  return '\n'.join(lines)


# ----------------------------------------------------------------------------- report


def _images_by_index(src, wanted: set[int]) -> dict[int, dict]:
  out = {}
  for ex in revisitop.iter_examples(src):
    i = int(ex['index'])
    if i in wanted:
      out[i] = ex
  return out


def write_dataset_report(out_dir: str, name: str, data_dir: str, gnd_cfg: dict, topk,
                         table: dict, n_queries: int, crop_rounding: str) -> tuple[str, str]:
  from dolg_jax.data import decode  # pylint: disable=g-import-not-at-top
  scores, idx = topk
  nq = min(n_queries, idx.shape[0])
  queries = _images_by_index(revisitop.data_source(name, data_dir, 'query'), set(range(nq)))
  wanted = {int(i) for i in idx[:nq].ravel()}
  index = _images_by_index(revisitop.data_source(name, data_dir, 'index'), wanted)
  rows = []
  for qi in range(nq):
    qex = queries[qi]
    img = decode.decode_rgb(qex['image'])
    y0, y1, x0, x1 = extract_lib.crop_box(qex['bbx'], img.shape[0], img.shape[1], crop_rounding)
    g = gnd_cfg['gnd'][qi]
    results, meta = [], []
    for s, i in zip(scores[qi], idx[qi]):
      ex = index[int(i)]
      results.append((decode.decode_rgb(ex['image']), report.label_of(int(i), g)))
      meta.append((ex['id'].decode() if isinstance(ex['id'], bytes) else ex['id'], float(s)))
    rows.append({'query': img[y0:y1, x0:x1], 'results': results, 'result_meta': meta,
                 'query_name': gnd_cfg['qimlist'][qi], 'ap': table['medium']['aps'][qi]})
  summary = format_table({name: {'base': table}})
  return report.write_report(out_dir, f'report_{name}', rows, summary)


# ----------------------------------------------------------------------------- main logic


def default_output_dir(workdir: Optional[str], checkpoint: Optional[str]) -> str:
  if workdir:
    return os.path.join(workdir, 'eval')
  return os.path.abspath(checkpoint).rstrip('/') + '_eval'


def evaluate_variables(config: ml_collections.ConfigDict, apply_fn: Callable, variables: Any,
                       output_dir: str, *, source: str = '') -> dict:
  """Evaluates (apply_fn, variables) on config.eval.datasets; writes results.json and reports."""
  e = config.eval
  data_dir = os.path.expanduser(e.data_dir)
  cfg = extract_lib.from_config(e)
  extractor = extract_lib.Extractor(apply_fn, variables, cfg)
  # The cache key names the weights and the dtype the descriptors were computed in.
  model_key = f'{variables_hash(variables)}-{eval_dtype(config)}'
  cache_dir = os.path.join(output_dir, 'cache') if e.get('cache', True) else None
  t_start = time.perf_counter()
  distractors = None
  if e.use_distractors:
    distractors = split_descriptors(extractor, e.get('distractors', 'revisitop1m'), data_dir,
                                    'index', cache_dir=cache_dir, model_key=model_key,
                                    use_crop=False)
  results, reports = {}, {}
  for name in e.datasets:
    gnd_cfg = revisitop.load_gnd(name, data_dir)
    db = split_descriptors(extractor, name, data_dir, 'index', cache_dir=cache_dir,
                           model_key=model_key, use_crop=False)
    q = split_descriptors(extractor, name, data_dir, 'query', cache_dir=cache_dir,
                          model_key=model_key, use_crop=True)
    res = score_dataset(q, db, gnd_cfg['gnd'], e, distractors)
    topk = res.pop('topk')
    results[name] = res
    if int(e.get('report_queries', 0)) > 0 and jax.process_index() == 0:
      reports[name] = write_dataset_report(output_dir, name, data_dir, gnd_cfg, topk, res['base'],
                                           int(e.report_queries), cfg.crop_rounding)
  out = {'source': source, 'model_hash': model_key, 'extraction': cfg.key(),
         'search': {k: e.get(k) for k in ('qe_k', 'qe_alpha', 'dba_k', 'dba_alpha')},
         'use_distractors': bool(e.use_distractors), 'results': results,
         'compile_count': extractor.compile_count,
         'reports': {k: list(v) for k, v in reports.items()},
         'seconds': time.perf_counter() - t_start}
  if jax.process_index() == 0:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, 'results.json'), 'w') as f:
      json.dump(out, f, indent=1)
  out['table'] = format_table(results)
  return out


def run(config: ml_collections.ConfigDict, *, workdir: Optional[str] = None,
        checkpoint: Optional[str] = None, output_dir: Optional[str] = None) -> dict:
  apply_fn, variables, source = load_model(config, workdir=workdir, checkpoint=checkpoint)
  output_dir = output_dir or config.eval.get('output_dir', '') or default_output_dir(workdir,
                                                                                     checkpoint)
  return evaluate_variables(config, apply_fn, variables, output_dir, source=source)


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config is required.')
  cache = config.eval.get('xla_cache_dir', '')
  if cache:  # compiled executables persist: a re-evaluation does not recompile every shape
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(cache))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  out = run(config, workdir=_WORKDIR.value, checkpoint=_CHECKPOINT.value,
            output_dir=_OUTPUT_DIR.value)
  print(out['table'])
  out_dir = _OUTPUT_DIR.value or config.eval.get('output_dir', '') or default_output_dir(
      _WORKDIR.value, _CHECKPOINT.value)
  print(f'results: {os.path.join(out_dir, "results.json")}')
  for name, (html_path, png) in out['reports'].items():
    print(f'report {name}: {html_path} {png}')


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).')
  _WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir (latest checkpoint).')
  _CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Released .pyth/.pth, converted dir, or '
                                    'one of our checkpoint step dirs.')
  _OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Where results.json, reports and the '
                                    'descriptor cache go.')
  app.run(main)
