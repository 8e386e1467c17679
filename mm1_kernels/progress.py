"""The one progress bar of the project (checkpoint loading/saving, the model demo, the benchmarks).

``tqdm`` when it is installed (an optional dependency), else a plain ``desc: n/total`` counter
on stderr. The bar never shows when ``enabled`` is false, and tqdm hides it by itself when its
stream is not a terminal (``disable=None``), so logs and CI output stay clean.
"""
from __future__ import annotations

import sys
from typing import Iterable, Optional


class _PlainBar:
    """The fallback without tqdm: the same ``update``/``close``/iteration/``with`` interface."""

    def __init__(self, iterable, total, desc, enabled, file):
        self.iterable, self.total, self.desc, self.n = iterable, total, desc, 0
        self.file = file
        self.enabled = enabled and file.isatty()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.enabled:
            total = f"/{self.total}" if self.total is not None else ""
            print(f"\r{self.desc}: {self.n}{total}", end="", file=self.file, flush=True)

    def close(self) -> None:
        if self.enabled and self.n:
            print(file=self.file, flush=True)
        self.enabled = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress_bar(iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "",
                 enabled: bool = True, unit: str = "it", file=None):
    """A progress bar over ``iterable`` (iterate it) or up to ``total`` (call ``update(n)``).

    Returns an object with ``update(n=1)``, ``close()``, iteration (when ``iterable`` is given)
    and the context-manager protocol. Writes to ``file`` (default stderr).
    """
    file = sys.stderr if file is None else file
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainBar(iterable, total, desc, enabled, file)
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, file=file,
                disable=None if enabled else True)
