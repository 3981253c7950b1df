"""Progress lines with a rate and an ETA, formatted by tqdm (`tqdm.format_meter`).

`Progress(total, bar_format, initial=0, **meter)` counts units done (`advance(n)`, `at(n)`) towards
`total` (None: unknown); `rate()` is the mean rate since the clock started, `eta_s()` the seconds
left; `exclude(seconds)` leaves time spent elsewhere (an evaluation) out, `restart(n)` restarts the
clock at n. `line(**fields)` is `bar_format` filled with tqdm's fields (`n`, `total`, `percentage`,
`rate_noinv`, `remaining`, `n_fmt`, `rate_fmt`, ...; `meter` passes tqdm's `unit`, `unit_scale`,
`unit_divisor`). `Printer` prints whole lines (as logs want, no carriage returns) at most every
`every` seconds, and the last one on `close()`. The clock is ours: it must skip evaluations.
"""

import sys
import time
from typing import Optional, TextIO

import tqdm


class Progress:
  """Units done towards `total`, the mean rate since the clock started and the line of both."""

  def __init__(self, total: Optional[int], bar_format: str, initial: int = 0, **meter):
    self.total, self.bar_format, self.meter = total, bar_format, meter
    self.restart(initial)

  def restart(self, n: int) -> None:
    """Restarts the clock with `n` units done."""
    self.n = self._n0 = n
    self._t0 = time.perf_counter()

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` out of the rate and the ETA."""
    self._t0 += seconds

  def advance(self, n: int = 1) -> None:
    self.n += n

  def at(self, n: int) -> None:
    self.n = n

  def elapsed_s(self) -> float:
    return time.perf_counter() - self._t0

  def rate(self) -> float:
    """Units per second since the clock started (0.0 before any)."""
    elapsed = self.elapsed_s()
    return (self.n - self._n0) / elapsed if elapsed > 0 else 0.0

  def eta_s(self) -> float:
    """Seconds left at the mean time per unit since the clock started (the whole elapsed time
    per unit while none is done); nan when the total is unknown."""
    if self.total is None:
      return float('nan')
    return self.elapsed_s() / max(self.n - self._n0, 1) * (self.total - self.n)

  def done(self) -> bool:
    return self.total is not None and self.n >= self.total

  def line(self, **fields) -> str:
    """`bar_format` with tqdm's fields for the current count and `fields`."""
    done = 100.0 * self.n / self.total if self.total else 100.0  # tqdm's, with a total
    return tqdm.tqdm.format_meter(
      self.n,
      self.total,
      self.elapsed_s(),
      rate=self.rate(),
      initial=self._n0,
      bar_format=self.bar_format,
      **self.meter,
      **{'percentage': done, **fields},
    )


class Printer:
  """Prints `progress.line()` to `stream` on `update` at most every `every` seconds, when the
  total is reached, and on `close()` unless that count was printed; nothing when not `enabled`."""

  def __init__(
    self,
    progress: Progress,
    enabled: bool = True,
    every: float = 2.0,
    stream: Optional[TextIO] = None,
  ):
    self.progress, self.enabled, self.every = progress, enabled, every
    self.stream = stream or sys.stderr
    self._last, self._printed = -float('inf'), None

  def update(self, n: int = 1) -> None:
    self.progress.advance(n)
    now = time.perf_counter()
    if now - self._last >= self.every or self.progress.done():
      self._last = now
      self._print()

  def close(self) -> None:
    """Prints the final count (once) if the last line printed showed another."""
    if self._printed != self.progress.n:
      self._print()

  def _print(self) -> None:
    if self.enabled and self._printed != self.progress.n:
      self._printed = self.progress.n
      print(self.progress.line(), file=self.stream, flush=True)
