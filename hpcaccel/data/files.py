"""Opening the data files: counted, lazily, a bounded number at a time.

On a parallel filesystem every open is a request to the metadata server, so the data layer
opens files only through `open_h5` (which counts them) and readers keep their handles in
`Handles`: a file is opened when it is first read from and at most `max_open` stay open
(least recently used closed first). `COUNTERS` holds this process's (this rank's) totals:
files opened and bytes read, reported per run as max and min over ranks.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import h5py
import numpy as np

from ..errors import UsageError
from .sharding import locate

DEFAULT_MAX_OPEN = 8


class IOCounters:
    """Files opened and bytes read by this process (all threads)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.files_opened = 0
        self.bytes_read = 0

    def opened(self, n: int = 1) -> None:
        with self._lock:
            self.files_opened += n

    def read(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_read += int(nbytes)

    def snapshot(self) -> dict:
        with self._lock:
            return {"files_opened": self.files_opened, "bytes_read": self.bytes_read}


COUNTERS = IOCounters()


def damaged(flag: str, path: str, error: BaseException) -> UsageError:
    """The one line for a file h5py recognises as HDF5 but cannot open or read."""
    why = str(error).splitlines()[0] if str(error) else type(error).__name__
    return UsageError(f"{flag} {path}: damaged HDF5 file, cannot be read (cut short by an "
                      f"interrupted copy? copy it again): {why}")


def open_h5(path: str, flag: str = "--data") -> h5py.File:
    """Open `path` read-only, counted; a file that cannot be opened is bad input."""
    try:
        handle = h5py.File(path, "r")
    except OSError as e:
        raise damaged(flag, path, e) from None
    COUNTERS.opened()
    return handle


class Handles:
    """Open files of one dataset, owned by one thread: opened on first read, LRU-bounded."""

    def __init__(self, files, lengths, max_open: int = DEFAULT_MAX_OPEN, flag: str = "--data"):
        self.files, self.lengths, self.flag = tuple(files), list(lengths), flag
        self.max_open = max(1, int(max_open))
        self._open: OrderedDict[int, h5py.File] = OrderedDict()

    def get(self, f: int):
        """(file, x, y) of file `f`, opened now if it is not open."""
        h = self._open.get(f)
        if h is not None:
            self._open.move_to_end(f)
            return h
        while len(self._open) >= self.max_open:
            _, old = self._open.popitem(last=False)
            old[0].close()
        h = open_h5(self.files[f], self.flag)
        self._open[f] = h = (h, h["x"], h["y"])  # datasets looked up once per open
        return h

    def read(self, ranges) -> tuple[np.ndarray, np.ndarray]:
        """Samples of the global `ranges`, concatenated in order: x as float32, y as int64
        (labels, of any shape) or float32 (float targets).

        Read straight into the result (HDF5 converts the types while reading): no
        concatenation or conversion copies, which cost as much as the read itself."""
        parts = locate(ranges, self.lengths)
        n = sum(b - a for _, a, b in parts)
        _, xd, yd = self.get(parts[0][0])
        shape, y_shape = xd.shape[1:], yd.shape[1:]
        y_dtype = np.int64 if yd.dtype.kind in "iu" else np.float32
        x, y = np.empty((n, *shape), dtype=np.float32), np.empty((n, *y_shape), dtype=y_dtype)
        pos = 0
        for f, a, b in parts:
            _, xd, yd = self.get(f)
            xd.read_direct(x, np.s_[a:b], np.s_[pos:pos + b - a])
            yd.read_direct(y, np.s_[a:b], np.s_[pos:pos + b - a])
            pos += b - a
        COUNTERS.read(n * (xd.dtype.itemsize * int(np.prod(shape))
                           + yd.dtype.itemsize * int(np.prod(y_shape))))
        return x, y

    def close(self) -> None:
        while self._open:
            _, h = self._open.popitem()
            h[0].close()
