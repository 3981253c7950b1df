"""The embedded demo as a library: data in, a trained DOLG out, a table that shows it learned.

`run_demo(config, workdir)` (called by `python -m dolg_jax.demo`):
1. writes procedural places (dolg_jax.data.synthetic.demo_data) in the official GLDv2 layout
   (training) and the revisited-Oxford layout (the 'rdemo' benchmark, disjoint places) under
   `config.demo.root` and converts them with the real builders, unless already prepared;
2. evaluates the untrained model (the training run's exact initial state) with the evaluation
   library (dolg_jax.retrieval.evaluate);
3. trains with the real training loop (resuming a checkpoint the workdir holds);
4. evaluates the trained checkpoint as `dolg_jax.eval` does, prints both rows in one
   Easy / Medium / Hard table and writes WORKDIR/demo_results.json.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import ml_collections

from dolg_jax import atomic
from dolg_jax import models
from dolg_jax.data import gldv2
from dolg_jax.data import revisitop
from dolg_jax.data.synthetic import demo_data
from dolg_jax.retrieval import evaluate as evaluate_lib
from dolg_jax.training import checkpointing
from dolg_jax.training import loop
from dolg_jax.training import state as state_lib


def _say(message: str) -> None:
  print(f'[demo {time.strftime("%H:%M:%S")}] {message}', flush=True)


def prepare_data(config: ml_collections.ConfigDict) -> None:
  """Writes and converts the demo datasets unless the prepared datasets already exist."""
  root = os.path.expanduser(config.demo.root)
  train_dir = os.path.expanduser(config.data.data_dir)
  eval_dir = os.path.expanduser(config.eval.data_dir)
  spec = demo_data.DemoSpec(**{k: config.demo[k] for k in config.demo if k != 'root'})
  if not gldv2.builder(config.data.dataset, train_dir).is_prepared():
    manual = os.path.join(root, 'manual', 'gldv2')
    _say(
      f'writing {spec.num_train_places} training places x {spec.train_views} views '
      f'(GLDv2 layout) to {manual}'
    )
    demo_data.write_gldv2(manual, spec)
    _say('converting with the GLDv2 builder')
    gldv2.prepare(config.data.dataset, manual, train_dir)
  if not revisitop.builder('rdemo', eval_dir).is_prepared():
    manual = os.path.join(root, 'manual', 'rdemo')
    _say(
      f'writing the rdemo benchmark ({spec.num_query_places} query places, '
      f'{spec.num_distractor_places} distractor places; revisitop layout) to {manual}'
    )
    demo_data.write_revisited(manual, 'rdemo', spec)
    _say('converting with the revisitop builder')
    revisitop.prepare('rdemo', manual, eval_dir)


def initial_variables(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The model variables the training run starts from (same initialiser, same seed)."""
  model = models.build_model(config.model, config.compute_dtype)
  v = jax.jit(
    lambda rng: state_lib.init_variables(
      model,
      models.margins.init_head_weight,
      rng,
      config.data.image_size,
      config.head.num_classes,
      config.model.embedding_dim,
    )
  )(jax.random.key(config.seed))
  return {'params': v['params']['model'], 'batch_stats': v['batch_stats']}


def format_table(rows: dict[str, dict]) -> str:
  """One line per model: mAP and mP@10 of each protocol on each dataset (percent)."""
  lines = []
  for dataset in next(iter(rows.values())):
    lines.append(f'{dataset:>24}   {"Easy":>13} {"Medium":>13} {"Hard":>13}')
    lines.append(f'{"":>24}   ' + ' '.join(f'{"mAP  mP@10":>13}' for _ in range(3)))
    for label, results in rows.items():
      base = results[dataset]['base']
      cells = ' '.join(
        f'{100 * base[p]["map"]:6.2f} {100 * base[p]["mp@10"]:6.2f}'
        for p in ('easy', 'medium', 'hard')
      )
      lines.append(f'{label:>24}   {cells}')
  return '\n'.join(lines)


def run_demo(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Steps 1-4 of the module docstring; returns {'untrained': results, 'trained': results, ...}."""
  t0 = time.time()
  prepare_data(config)
  t_data = time.time() - t0
  os.makedirs(workdir, exist_ok=True)

  _say('evaluating the untrained model (the training run\'s initial weights)')
  apply_fn = evaluate_lib.make_apply_fn(config)
  untrained = evaluate_lib.evaluate_variables(
    config,
    apply_fn,
    initial_variables(config),
    os.path.join(workdir, 'eval_untrained'),
    source='untrained',
  )
  saved = checkpointing.list_steps(checkpointing.checkpoint_dir(workdir))
  if saved:
    _say(
      f'{workdir} holds a checkpoint of step {saved[-1]}: resuming from it (pass a new '
      '--workdir to train from scratch)'
    )
  _say(
    f'training {config.train.num_train_steps} steps of {config.train.global_batch_size} '
    f'images ({config.data.image_size}x{config.data.image_size})'
  )
  t1 = time.time()
  loop.train_and_evaluate(config, workdir)
  t_train = time.time() - t1

  _say('evaluating the trained checkpoint (the evaluation library, as dolg_jax.eval runs it)')
  trained = evaluate_lib.run(config, workdir=workdir, output_dir=os.path.join(workdir, 'eval'))
  sg = ' SG' if config.eval.rerank else ''  # re-ranked rows say so (as in scoring.format_table)
  rows = {f'untrained{sg}': untrained['results'], f'trained{sg}': trained['results']}
  out = {
    'untrained': untrained['results'],
    'trained': trained['results'],
    'seconds': {'data': t_data, 'train': t_train, 'total': time.time() - t0},
    'num_train_steps': config.train.num_train_steps,
  }
  atomic.write_json(os.path.join(workdir, 'demo_results.json'), out, indent=1)
  print('\n' + format_table(rows) + '\n', flush=True)
  _say(
    f'done in {out["seconds"]["total"]:.0f}s (data {t_data:.0f}s, training {t_train:.0f}s); '
    f'visual report: {os.path.join(workdir, "eval")}'
  )
  return out
