"""Builds: one at a time, on one thread of lowered priority, each recorded in its version's lifecycle.

Merging competes with requests for the same cores, and requests should win: the thread runs
at niceness 10 (Linux), and the OpenMP workers it starts inherit that; at that priority a build
may use every core (``every_core``). Work that is already on
the builder (a push that builds, then activates) runs inline instead of queueing behind itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TypeVar

import torch

from tureen.core.blends import Blend
from tureen.core.devices import available_cores
from tureen.core.kitchen import Kitchen
from tureen.core.lifecycle import Lifecycle
from tureen.core.observer import Observer
from tureen.core.policy import SpecPolicy
from tureen.core.residency import Residency
from tureen.core.store import StoredVersion
from tureen.errors import OutOfMemory, SoupError, VersionConflict

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


@dataclass(frozen=True)
class Build:
    """A build in progress."""

    model: str
    version: int
    stage: str
    fraction: float
    started: float


class Builds:
    """Turns stored versions into blends on the builder, and records what became of each."""

    def __init__(
        self,
        kitchen: Kitchen,
        lifecycle: Lifecycle,
        residency: Residency,
        policy: SpecPolicy,
        observer: Observer,
        changed: Callable[[], None],
        threads: int | None = None,
    ) -> None:
        """``changed`` is told whenever a build starts, moves on or ends (status watchers wake);
        ``threads``: torch's CPU threads for a build (default: every core)."""
        self._threads = threads
        self.kitchen = kitchen
        self.lifecycle = lifecycle
        self.residency = residency
        self.policy = policy
        self._observer = observer
        self._changed = changed
        self._builder = Builder()
        self._lock = threading.Lock()
        self._in_progress: dict[str, Build] = {}

    def submit(self, work: Callable[..., T], *args: object) -> Future[T]:
        return self._builder.submit(work, *args)

    def build(self, stored: StoredVersion) -> Blend:
        """Build on the builder thread: queued behind the builds before it, or inline when the
        caller is a build already (a push that activates). Never call it holding a model lock."""
        return self._builder.run(self._build_here, stored)

    def progress_of(self, model: str) -> Build | None:
        with self._lock:
            return self._in_progress.get(model)

    def shutdown(self) -> None:
        self._builder.shutdown()

    def _build_here(self, stored: StoredVersion) -> Blend:
        if stored.state == "failed":
            raise VersionConflict(
                f"model {stored.model!r} version {stored.version} failed to build ({stored.reason}); push a fixed spec"
            )
        model, version = stored.model, stored.version
        self._set(model, Build(model, version, "starting", 0.0, time.time()))

        def progress(stage: str, fraction: float) -> None:
            current = self.progress_of(model)
            if current is not None:
                self._set(model, replace(current, stage=stage, fraction=fraction))

        try:
            if stored.origin != "operator":  # stored by anyone who could push: this replica's flags decide
                self.policy.check(stored.spec)
            stored = self.lifecycle.building(stored)
            budget = self.residency.budget(model, version)
            with every_core(self._threads):
                blend = self.kitchen.build(stored.spec, version, progress, budget, resolution=stored.resolution)
        except MemoryError as exc:  # a build that cannot get memory must not take the server down
            failure = OutOfMemory(f"model {model!r} version {version}: out of memory while building: {exc}")
            self._failed(stored, failure)
            raise failure from None
        except SoupError as exc:
            self._failed(stored, exc)
            raise
        finally:
            self._set(model, None)
        self.lifecycle.built(stored, blend)
        return blend

    def _failed(self, stored: StoredVersion, exc: SoupError) -> None:
        """Record a failed build (``Lifecycle.failed``: the spec's fault, or this replica's)."""
        self._observer.build_failed(stored.model, exc.reason)
        _log.error("model %s: version %d failed to build: %s", stored.model, stored.version, exc)
        try:
            self.lifecycle.failed(stored, exc)
        except SoupError as store_error:  # the version may have been deleted meanwhile
            _log.warning("model %s: version %d: cannot record the failure: %s", stored.model, stored.version, store_error)

    def _set(self, model: str, build: Build | None) -> None:
        with self._lock:
            if build is None:
                self._in_progress.pop(model, None)
            else:
                self._in_progress[model] = build
        self._changed()


@contextlib.contextmanager
def every_core(threads: int | None = None) -> Iterator[None]:
    """Let this build's torch operators use ``threads`` (default: every core; a server gives the
    count of a forward on its loop, which the operator's ``--cpu-threads`` or ``OMP_NUM_THREADS``
    sets), restoring this thread's count after.

    Torch's thread count is per thread for the threads that already run (the serving loop and
    the forward workers keep theirs: ``--cpu-threads``); the build runs at lowered priority, so
    requests still win the cores. ``python bench/llm_merge.py --params 1.0`` on 2 cores: the
    push-to-serving of the 1B linear soup from disk took 12.3 s with one thread, 7.5 s with both.
    """
    serving = torch.get_num_threads()
    torch.set_num_threads(threads or available_cores())
    try:
        yield
    finally:
        torch.set_num_threads(serving)


def _lower_priority() -> None:
    """Lower the calling thread's scheduling priority (Linux: per-thread niceness)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BUILD_NICENESS)
    except (AttributeError, OSError):  # not Linux, or not allowed: builds run at normal priority
        _log.debug("cannot lower the build thread's priority")
