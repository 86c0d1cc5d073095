"""The one ``wait_for`` of the test suite."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
    """``predicate()``'s first truthy value within ``timeout`` seconds, else an AssertionError naming ``what``.

    An exception from the predicate counts as "not yet" (what we wait for may not exist yet) and is named in
    the error if the wait times out."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - reported below if the wait times out
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {last_error})")
