"""Peak resident memory of this process and its children (the decode workers), sampled on a thread."""
from __future__ import annotations

import threading

import psutil

from raw_http import peak_rss, reset_peak_rss


def tree_rss() -> int:
    """RSS of this process + all its descendants, bytes (a child that exits while being read counts 0)."""
    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return total


class TreePeak:
    """`with TreePeak() as peak: ...` then `peak.growth`: the largest rise of the tree's RSS over its value at
    entry, sampled every 20 ms, or of this process's own peak (VmHWM, exact), whichever is larger."""

    def __init__(self):
        self._stop, self._max = threading.Event(), 0

    def __enter__(self) -> "TreePeak":
        self._own_base, self._tree_base = reset_peak_rss(), tree_rss()
        self._max = self._tree_base
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self._max = max(self._max, tree_rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.growth = max(self._max - self._tree_base, peak_rss() - self._own_base)
