"""Training throughput that counts only training: compilation, evaluation and checkpoint
saves run inside `paused()` and are left out of both the log window's rate and the run's."""
import contextlib
import time
from typing import Optional


class Throughput:
  """Images per second per log window (`read`) and over the whole run (`overall`)."""

  def __init__(self, batch_size: int, clock=time.perf_counter):
    self.batch_size = int(batch_size)
    self._clock = clock
    self._window_start = clock()
    self._window_paused = 0.0
    self._window_steps = 0
    self._steps = 0
    self._seconds = 0.0

  @contextlib.contextmanager
  def paused(self):
    start = self._clock()
    try:
      yield
    finally:
      self._window_paused += self._clock() - start

  def count(self, steps: int = 1) -> None:
    self._window_steps += steps

  def read(self) -> Optional[float]:
    """The rate since the previous read (call it once the steps' results are on the host, so
    that their device time is inside the window); None if no step or no time was counted."""
    now = self._clock()
    seconds = now - self._window_start - self._window_paused
    steps = self._window_steps
    self._steps += steps
    self._seconds += max(seconds, 0.0)
    self._window_start, self._window_paused, self._window_steps = now, 0.0, 0
    return steps * self.batch_size / seconds if steps and seconds > 0 else None

  @property
  def overall(self) -> Optional[float]:
    """The rate over every window read so far."""
    return self._steps * self.batch_size / self._seconds if self._steps and self._seconds > 0 else None
