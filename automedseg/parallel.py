"""Map a function over items in worker processes, in order, with an optional progress bar.

Example:
    >>> list(parallel_map(abs, [-1, 2, -3], jobs=1))
    [1, 2, 3]
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def parallel_map(fn: Callable[[T], R], items: Iterable[T], *, jobs: int = 2, desc: str = "",
                 progress: bool = False) -> Iterator[R]:
    """Map ``fn`` over ``items`` in ``jobs`` processes (in order), with an optional progress bar."""
    items = list(items)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc=desc, unit="case", dynamic_ncols=True)
    try:
        if jobs <= 1 or len(items) <= 1:
            for it in items:
                yield fn(it)
                if bar is not None:
                    bar.update()
        else:
            ctx = multiprocessing.get_context("fork")
            with ctx.Pool(min(jobs, len(items))) as pool:
                for r in pool.imap(fn, items, chunksize=max(1, min(8, len(items) // (4 * jobs)))):
                    yield r
                    if bar is not None:
                        bar.update()
    finally:
        if bar is not None:
            bar.close()
