"""The builder: one build at a time, on one thread of lowered priority.

Merging competes with requests for the same cores, and requests should win: the thread runs
at niceness 10 (Linux), and the OpenMP workers it starts inherit that. Work that is already on
the builder (a push that builds, then activates) runs inline instead of queueing behind itself.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

_log = logging.getLogger("tureen.controller")
T = TypeVar("T")
BUILD_NICENESS = 10


class Builder:
    """A single-thread executor that knows when it is asked from its own thread."""

    def __init__(self) -> None:
        self._on_builder = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tureen-build", initializer=self._enter)

    def submit(self, work: Callable[..., T], *args: object) -> Future[T]:
        """Queue ``work`` behind the builds before it."""
        return self._pool.submit(work, *args)

    def run(self, work: Callable[..., T], *args: object) -> T:
        """Run ``work`` on the builder and wait for it; inline when called from the builder itself."""
        if getattr(self._on_builder, "active", False):
            return work(*args)
        return self._pool.submit(work, *args).result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _enter(self) -> None:
        self._on_builder.active = True
        _lower_priority()


def _lower_priority() -> None:
    """Lower the calling thread's scheduling priority (Linux: per-thread niceness)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BUILD_NICENESS)
    except (AttributeError, OSError):  # not Linux, or not allowed: builds run at normal priority
        _log.debug("cannot lower the build thread's priority")
