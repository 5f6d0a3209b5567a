"""A process pool that maps a function over a stream of tasks and yields results in task order,
with a bounded number of tasks in flight, so neither inputs nor results pile up in memory."""

from __future__ import annotations

import collections
import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@contextlib.contextmanager
def _main_script_hidden() -> Iterator[None]:
    """While workers start, keep `spawn` from re-running the parent's main script in them.

    A spawned child runs the parent's `__main__` file again before it takes a task. The workers
    need nothing from it (their code is in importable modules), and some scripts fail when run
    twice: inside an Airflow worker `__main__` is the `airflow` command, whose start-up dies in a
    child. A main module run by name (`python -m ...`) has a `__spec__` and is left alone.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or path is None or getattr(main, "__spec__", None) is not None:
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


def ordered_map(
    fn: Callable[[T], R],
    tasks: Iterable[T],
    workers: int,
    initializer: Callable[..., None],
    initargs: tuple[Any, ...] = (),
) -> Iterator[R]:
    """`fn` over `tasks` in `workers` processes (each set up by `initializer(*initargs)`), results
    in task order, at most 2 tasks per worker in flight. One worker runs in this process."""
    if workers <= 1:
        initializer(*initargs)
        yield from map(fn, tasks)
        return
    ctx = get_context("spawn")  # the parent holds MindSpore's threads: do not fork it
    with (
        _main_script_hidden(),
        ProcessPoolExecutor(workers, mp_context=ctx, initializer=initializer, initargs=initargs) as pool,
    ):
        pending: collections.deque[Future[R]] = collections.deque()
        try:
            for task in tasks:
                pending.append(pool.submit(fn, task))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of `size` consecutive items (the last one shorter): the pool's tasks."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
