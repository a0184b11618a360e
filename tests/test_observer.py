"""Metrics code that fails is logged and never reaches the work it observes."""

from __future__ import annotations

import logging

import pytest

from tureen.core.observer import SafeObserver


class Broken:
    """An observer whose every hook raises, as a buggy metrics backend might."""

    def __init__(self) -> None:
        self.calls = 0

    def request_finished(self, *args: object) -> None:
        self.calls += 1
        raise RuntimeError("metrics backend exploded")

    def blend_built(self, *args: object) -> None:
        raise ValueError("also broken")


def test_a_raising_observer_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    inner = Broken()
    observer = SafeObserver(inner)  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="tureen.observer"):
        observer.request_finished("m", "1", None, 0.1, 0.0, 0.1)
        observer.request_finished("m", "1", None, 0.1, 0.0, 0.1)
        observer.blend_built("m", 1, 0.5)
    assert inner.calls == 2
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("observer request_finished failed; the work it observed goes on") == 2
    assert "observer blend_built failed; the work it observed goes on" in messages
