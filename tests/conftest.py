"""Session-wide test settings.

CI runs the suite on 2 workers (`python -m pytest -q tests -n 2`; pyproject.toml adds
`--dist=loadfile --no-loadscope-reorder`). Each test file runs whole on one worker, so a file's
module- and session-scoped fixtures (a compiled step, a built dataset, the SLURM cluster) are made
once, and the tests of one file never run at the same time as each other (the SLURM tests share
one cluster; the multi-process tests of a file share their ports' and workdirs' sequencing). Tests
of different files may run at the same time: every test writes under its own `tmp_path` or a
`mkdtemp` directory, asks the kernel for free ports, and the paths shared across files
(`train_testlib.ROOT`: the XLA compilation cache and the tiny GLDv2 fixture, built under a lock)
are safe to share between processes.

Under xdist the files are handed to the workers longest first (LONGEST_FIRST, then the others in
their usual order), so that the short files fill the gaps at the end instead of one long file
starting last. Run alone (no `-n`), the order is pytest's.
"""

import os

# The longest files, longest first: their share of one run of the whole suite on 2 workers (2 cores,
# seconds, a loaded machine; the SLURM tests mostly wait for the scheduler). Files not listed
# follow in pytest's order.
LONGEST_FIRST = (
  'test_slurm.py',  # ~500 s (time limit, dead task, preemption, run to the end)
  'test_demo.py',  # ~280 s
  'test_local_launcher.py',  # ~175 s
  'test_official_training.py',  # ~165 s (float32, float64 and a wrong-formula run)
  'test_finetune.py',  # ~150 s
  'test_model_axis.py',  # ~140 s
  'test_multihost.py',  # ~125 s
  'test_eval.py',  # ~110 s
  'test_train_loop.py',  # ~110 s
  'test_train_faults.py',  # ~100 s
  'test_index_hardening.py',  # ~90 s
  'test_export.py',  # ~60 s
  'test_accelerator_check.py',  # ~55 s
  'test_extract.py',  # ~45 s
  'test_collection_search.py',  # ~45 s
  'test_models.py',  # ~45 s
)


def pytest_collection_modifyitems(config, items):
  del config
  if not os.environ.get('PYTEST_XDIST_WORKER'):
    return
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  # A stable sort: the order of the tests inside each file is kept.
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.path)), len(rank)))
