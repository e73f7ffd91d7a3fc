"""Progress lines for long loops: `label i/N, rate unit/s, ETA`, through logging."""
from __future__ import annotations

import logging
import time


class Progress:
    def __init__(self, label: str, total: int, unit: str = "it", logger: logging.Logger | None = None,
                 every_s: float = 10.0) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.log = logger or logging.getLogger("engine.progress")
        self.every_s = every_s
        self.start = self.last = time.time()
        self.done = 0
        self.amount = 0.0  # e.g. tokens, for a throughput figure

    def update(self, steps: int = 1, amount: float = 0.0, extra: str = "") -> None:
        self.done += steps
        self.amount += amount
        now = time.time()
        if now - self.last < self.every_s and self.done < self.total:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        rate = f"{self.amount / elapsed:,.0f} {self.unit}/s" if self.amount else f"{self.done / elapsed:.2f}/s"
        tail = f", {extra}" if extra else ""
        self.log.info("%s %d/%d, %s, elapsed %.0fs, ETA %.0fs%s", self.label, self.done, self.total, rate,
                      elapsed, eta, tail)

    @property
    def elapsed(self) -> float:
        return time.time() - self.start
