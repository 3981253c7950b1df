"""Paths the tests use, relative to the repository (CI lays shared/ out beside it)."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The real revisitop ground truth (gnd_roxford5k.pkl, gnd_rparis6k.pkl): $REVISITOP_GND_DIR, else
# ../shared/data/revisitop beside the repository.
GND_DIR = os.environ.get(
  'REVISITOP_GND_DIR', os.path.join(os.path.dirname(REPO), 'shared', 'data', 'revisitop')
)
