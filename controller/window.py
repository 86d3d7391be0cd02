"""The last N rows of a few numbers, as one array, for fits that rebuild from a window."""

from __future__ import annotations

import numpy as np


class RowWindow:
    """The last `size` rows appended, oldest first, always one contiguous array (`rows()`):
    rows go into a buffer twice the window, and when it fills, the window moves back to its
    start, one copy per `size` rows. A fit reads the window without converting records."""

    def __init__(self, size: int, columns: int):
        self._buf = np.empty((2 * size, columns), dtype=np.float64)
        self._size, self._end, self._len = size, 0, 0

    def append(self, row: tuple) -> None:
        if self._end == len(self._buf):
            keep = self._size - 1
            self._buf[:keep] = self._buf[self._end - keep : self._end]
            self._end = keep
        self._buf[self._end] = row
        self._end += 1
        self._len = min(self._len + 1, self._size)

    def __len__(self) -> int:
        return self._len

    def rows(self) -> np.ndarray:
        """A view: valid until the next append."""
        return self._buf[self._end - self._len : self._end]
