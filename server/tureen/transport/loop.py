"""The event loop both transports serve on, in a thread of its own.

gRPC (``grpc.aio``) and HTTP (uvicorn) share it, and so do their requests' batches: a request
is received, decoded, batched, computed and answered on this one thread unless its blend's
forwards are slow (see ``tureen.core.engine``). Blocking calls (the admin API, pushes that wait
for a build) run on gRPC's thread pool or Starlette's, never here.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class ServingLoop:
    """An asyncio loop running in a daemon thread; ``call`` runs a coroutine on it from any other thread."""

    def __init__(self) -> None:
        self.loop = _new_loop()
        self._thread = threading.Thread(target=self._run, name="tureen-serve", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coroutine`` on the loop and wait for its result (not from the loop's own thread)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        if not self._thread.is_alive():
            self.loop.close()
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (a dependency except on Windows), else asyncio's own loop.

    Measured here: over keep-alive connections from tritonclient.http and perf_analyzer, asyncio's
    selector loop answered each request ~40 ms late (delayed ACKs meeting the clients' split
    writes), uvloop in 0.7 ms; gRPC's asyncio server runs on either.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
