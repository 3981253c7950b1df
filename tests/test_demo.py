"""The embedded demo, shortened: data -> real builders -> real training loop -> eval; it learns."""

import json
import os

from configs import demo as demo_config
from dolg_jax.training import demo_run


def test_short_demo_learns_a_transferable_descriptor(tmp_path):
  config = demo_config.get_config()
  root = str(tmp_path / 'demo')
  config.demo.root = root
  config.data.data_dir = config.eval.data_dir = os.path.join(root, 'tfds')
  config.demo.num_train_places = 60
  config.demo.train_views = 16
  config.demo.num_query_places = 12
  config.demo.num_distractor_places = 24
  config.train.num_train_steps = 300
  config.train.checkpoint_every_steps = 300
  config.eval.report_queries = 2
  # Periodic evaluation inside the training loop, at the last step: validation accuracy and
  # retrieval mAP through the eval code (train.eval_retrieval).
  config.train.eval_every_steps = 300
  config.train.eval_batches = 4
  config.train.eval_retrieval = True
  workdir = str(tmp_path / 'workdir')

  out = demo_run.run_demo(config, workdir)

  before = out['untrained']['rdemo']['base']
  after = out['trained']['rdemo']['base']
  # Evaluation places are disjoint from the training places: this is retrieval, not recognition.
  assert after['medium']['map'] >= before['medium']['map'] + 0.15, (before, after)
  assert after['hard']['map'] > before['hard']['map']
  with open(os.path.join(workdir, 'demo_results.json')) as f:
    saved = json.load(f)
  assert saved['trained']['rdemo']['base']['medium']['map'] == after['medium']['map']
  assert os.path.exists(os.path.join(workdir, 'eval', 'results.json'))
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  in_training = [r for r in records if 'map/rdemo/base/medium' in r]
  assert [r['step'] for r in in_training] == [300]
  # The loop evaluated the same weights as the final checkpoint with the same code.
  assert in_training[0]['map/rdemo/base/medium'] == after['medium']['map']
  assert 0.0 < in_training[0]['val_accuracy'] <= 1.0
