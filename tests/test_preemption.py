"""SIGTERM before the training loop starts (imports, restore, compilation) is not lost: the loop's
handler sees it and the run stops after its first step with a checkpoint (exit code 75)."""

import os
import signal

from dolg_jax.training import preemption


def test_sigterm_while_starting_reaches_the_loop():
  previous = signal.getsignal(signal.SIGTERM)
  try:
    with preemption.PreemptionHandler() as fresh:
      assert not fresh.should_stop(1)          # No signal yet: training goes on.
    preemption.catch_early_sigterm()
    os.kill(os.getpid(), signal.SIGTERM)       # Arrives while the run is still starting.
    with preemption.PreemptionHandler() as handler:
      assert handler.should_stop(1)
  finally:
    preemption._EARLY.clear()  # pylint: disable=protected-access
    signal.signal(signal.SIGTERM, previous)
