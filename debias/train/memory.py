"""Peak memory of a piece of work (a training stage): what a stage needs, measured rather than estimated."""

from __future__ import annotations

import threading
from typing import Any


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class PeakMemory:
    """The process's peak resident memory between :meth:`start` and :meth:`stop`, sampled every ``interval``
    seconds in a thread (the kernel's own peak, ``ru_maxrss``, never resets, so it cannot give a per-stage peak),
    and on a CUDA device ``torch.cuda.max_memory_allocated`` since :meth:`start`.

    Example::

        peak = PeakMemory("cuda").start()
        trainer.train()
        peak.stop()  # {"rss_start_mib": ..., "rss_peak_mib": ..., "cuda_max_allocated_mib": ...}
    """

    def __init__(self, device: str = "cpu", interval: float = 0.02):
        import torch

        self.cuda = str(device).split(":")[0] in ("cuda", "auto") and torch.cuda.is_available()
        self.interval = interval
        self._done = threading.Event()

    def _sample(self) -> None:
        while not self._done.wait(self.interval):
            self.peak = max(self.peak, _rss_mib())

    def start(self) -> "PeakMemory":
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        self.begin = self.peak = _rss_mib()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        """``rss_start_mib``, ``rss_peak_mib`` and, on a GPU, ``cuda_max_allocated_mib`` (MiB, to 0.1)."""
        self._done.set()
        self._thread.join()
        out = {"rss_start_mib": round(self.begin, 1), "rss_peak_mib": round(max(self.peak, _rss_mib()), 1)}
        if self.cuda:
            import torch

            out["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return out
