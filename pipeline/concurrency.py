"""Bounded read-ahead: run work in a thread pool while the caller consumes results in order."""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator


def in_order(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, ahead: int) -> Iterator:
    """fn(item) for each item, run by `pool` with at most `ahead` in flight, yielded in order.

    Memory stays bounded by `ahead` results whatever the number of items; leaving the loop
    early (or an exception) cancels what has not started."""
    items = iter(items)
    in_flight: deque = deque()
    try:
        for item in items:
            in_flight.append(pool.submit(fn, item))
            if len(in_flight) >= ahead:
                break
        while in_flight:
            done = in_flight.popleft()
            for item in items:  # refill first, so the workers never wait on the consumer
                in_flight.append(pool.submit(fn, item))
                break
            yield done.result()
    finally:
        for future in in_flight:
            future.cancel()
