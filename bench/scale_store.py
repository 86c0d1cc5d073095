"""An in-process object store for the scale benchmark and the queue-cost tests.

``MemoryStore`` is a small fake with S3's semantics where the work queue depends on them:

* PUT is atomic; ``If-None-Match: *`` (``create``) and ``If-Match: <ETag>`` (``replace_if``) are checked
  and applied under one lock, as S3 does since 2024;
* ETags are the MD5 of the body; a conditional GET with the current ETag answers "not modified";
* every object has a ``LastModified`` in the store's own clock, with whole-second resolution like S3,
  and answers carry the store's time (``Date``), so ages are the store's;
* a listing returns keys in order, 1,000 per request.

``CountingStore`` wraps any Storage: it counts requests (by kind) and bytes each way, adds a fixed latency
per request, and can answer a share of requests with ``503 SlowDown``; ``Retrying`` then retries like
botocore's standard mode (exponential backoff with full jitter, 8 attempts).

Left out: bandwidth (a large GET costs its latency only; bytes are counted, not timed), per-prefix request
limits (SlowDown comes at a fixed random share, not from load), eventual effects of S3's replication
(S3 is strongly consistent since 2020, so none are modelled), multipart uploads, connection set-up, and the
answers lost after a write landed (tests/test_s3_faults.py covers those against moto).
"""

from __future__ import annotations

import bisect
import hashlib
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

from olmocr.pipeline.workspace.storage import NOT_MODIFIED, NotModified

LIST_PAGE = 1000


class SlowDown(Exception):
    """S3's throttling answer (503 SlowDown)."""


def _tag(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


class MemoryStore:
    """A fake S3 bucket in memory (see the module docstring). Thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.url = "mem://bench"
        self.clock = clock
        self._objects: dict[str, tuple[bytes, str, float]] = {}
        self._keys: list[str] = []  # sorted
        self._lock = threading.Lock()
        #: Lease takeovers of a lock that was still live by the store's clock (must stay 0).
        self.live_lease_takeovers = 0
        #: Writes per key of results/ and done_flags/ (each must be written once).
        self.writes: Counter[str] = Counter()
        self._written_at: dict[str, float] = {}  # lock key -> exact time of its last write

    def _now(self) -> float:
        return float(int(self.clock()))  # whole seconds, as S3's LastModified and Date

    def _put(self, key: str, data: bytes) -> None:
        if key not in self._objects:
            bisect.insort(self._keys, key)
        old = self._objects.get(key)
        if key.startswith("worker_locks/"):
            if old is not None:
                self._check_takeover(key, old, data)
            self._written_at[key] = self.clock()
        self._objects[key] = (data, _tag(data), self._now())
        if key.startswith(("results/", "done_flags/")):
            self.writes[key] += 1

    def _check_takeover(self, key: str, old: tuple[bytes, str, float], new: bytes) -> None:
        """Count a new holder's write over a lease still live by the exact time of its last write."""
        import json

        try:
            before, after = json.loads(old[0]), json.loads(new)
        except ValueError:
            return
        if before.get("lease_id") == after.get("lease_id"):
            return  # a renewal
        if self.clock() - self._written_at.get(key, float("-inf")) < float(before.get("lease_seconds", 0)):
            self.live_lease_takeovers += 1

    # ---- the Storage protocol ----------------------------------------------------------------------

    def read(self, key: str) -> bytes | None:
        found = self._objects.get(key)
        return None if found is None else found[0]

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        found = self._objects.get(key)
        return None if found is None else (found[0], found[1])

    def read_if_changed(self, key: str, tag: str | None) -> tuple[bytes, str] | None | NotModified:
        found = self._objects.get(key)
        if found is None:
            return None
        if tag is not None and found[1] == tag:
            return NOT_MODIFIED
        return found[0], found[1]

    def read_aged(self, key: str) -> tuple[bytes, str, float] | None:
        found = self._objects.get(key)
        return None if found is None else (found[0], found[1], max(0.0, self._now() - found[2]))

    def stat(self, key: str) -> tuple[str, float] | None:
        found = self._objects.get(key)
        return None if found is None else (found[1], max(0.0, self._now() - found[2]))

    def write(self, key: str, data: bytes) -> None:
        with self._lock:
            self._put(key, data)

    def create(self, key: str, data: bytes) -> bool:
        with self._lock:
            if key in self._objects:
                return False
            self._put(key, data)
            return True

    def replace_if(self, key: str, data: bytes, tag: str) -> bool:
        with self._lock:
            found = self._objects.get(key)
            if found is None or found[1] != tag:
                return False
            self._put(key, data)
            return True

    def delete(self, key: str) -> None:
        with self._lock:
            if self._objects.pop(key, None) is not None:
                i = bisect.bisect_left(self._keys, key)
                if i < len(self._keys) and self._keys[i] == key:
                    del self._keys[i]

    def list_page(self, prefix: str, after: str = "") -> list[tuple[str, float]]:
        """One listing request: up to 1,000 ``(key, age)`` after ``after``."""
        with self._lock:
            start = bisect.bisect_right(self._keys, after) if after else bisect.bisect_left(self._keys, prefix)
            page = []
            now = self._now()
            for key in self._keys[start : start + LIST_PAGE]:
                if not key.startswith(prefix):
                    break
                page.append((key, max(0.0, now - self._objects[key][2])))
            return page

    def list_ages(self, prefix: str) -> Iterator[tuple[str, float]]:
        after = ""
        while True:
            page = self.list_page(prefix, after)
            yield from page
            if len(page) < LIST_PAGE:
                return
            after = page[-1][0]

    def iter_list(self, prefix: str) -> Iterator[str]:
        return (key for key, _ in self.list_ages(prefix))

    def list(self, prefix: str) -> list[str]:
        return list(self.iter_list(prefix))

    def list_times(self, prefix: str) -> dict[str, float]:
        now = self._now()
        return {key: now - age for key, age in self.list_ages(prefix)}

    # ---- for building big workspaces quickly (not requests) ----------------------------------------

    def put_direct(self, key: str, data: bytes, age: float = 0.0) -> None:
        with self._lock:
            if key not in self._objects:
                bisect.insort(self._keys, key)
            self._objects[key] = (data, _tag(data), self._now() - age)


class CountingStore:
    """Counts requests and bytes, adds ``latency_s`` per request, answers ``slowdown`` of them with
    SlowDown (raised; wrap in :class:`Retrying`). Wraps a MemoryStore."""

    def __init__(self, inner: MemoryStore, latency_s: float = 0.0, slowdown: float = 0.0, seed: int = 1) -> None:
        self.inner = inner
        self.url = inner.url
        self.latency_s = latency_s
        self.slowdown = slowdown
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.bytes_in = 0  # to the client
        self.bytes_out = 0  # to the store
        self.throttled = 0

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.bytes_in = self.bytes_out = self.throttled = 0

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    def _request(self, kind: str, sent: int = 0) -> None:
        with self._lock:
            self.requests[kind] += 1
            self.bytes_out += sent
            throttle = self.slowdown and self._rng.random() < self.slowdown
            if throttle:
                self.throttled += 1
        if self.latency_s:
            time.sleep(self.latency_s)
        if throttle:
            raise SlowDown(f"503 SlowDown ({kind})")

    def _got(self, n: int) -> None:
        with self._lock:
            self.bytes_in += n

    def read(self, key: str) -> bytes | None:
        self._request("GET")
        data = self.inner.read(key)
        self._got(len(data or b""))
        return data

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        self._request("GET")
        found = self.inner.read_versioned(key)
        self._got(len(found[0]) if found else 0)
        return found

    def read_if_changed(self, key: str, tag: str | None) -> tuple[bytes, str] | None | NotModified:
        self._request("GET")
        found = self.inner.read_if_changed(key, tag)
        if isinstance(found, tuple):
            self._got(len(found[0]))
        return found

    def read_aged(self, key: str) -> tuple[bytes, str, float] | None:
        self._request("GET")
        found = self.inner.read_aged(key)
        self._got(len(found[0]) if found else 0)
        return found

    def stat(self, key: str) -> tuple[str, float] | None:
        self._request("HEAD")
        return self.inner.stat(key)

    def write(self, key: str, data: bytes) -> None:
        self._request("PUT", len(data))
        self.inner.write(key, data)

    def create(self, key: str, data: bytes) -> bool:
        self._request("PUT", len(data))
        return self.inner.create(key, data)

    def replace_if(self, key: str, data: bytes, tag: str) -> bool:
        self._request("PUT", len(data))
        return self.inner.replace_if(key, data, tag)

    def delete(self, key: str) -> None:
        self._request("DELETE")
        self.inner.delete(key)

    def list_page(self, prefix: str, after: str = "") -> list[tuple[str, float]]:
        self._request("LIST")
        page = self.inner.list_page(prefix, after)
        self._got(sum(len(k) + 120 for k, _ in page))  # ~ the XML of each <Contents> entry
        return page

    def _now(self) -> float:
        return self.inner._now()

    list_ages = MemoryStore.list_ages
    iter_list = MemoryStore.iter_list
    list = MemoryStore.list
    list_times = MemoryStore.list_times


class Retrying:
    """What botocore's standard retry mode does for SlowDown: up to ``attempts`` tries, sleeping a random
    share of ``min(max_backoff, base * 2**try)`` between them (full jitter)."""

    def __init__(self, inner: CountingStore, attempts: int = 8, base_s: float = 0.05, max_backoff_s: float = 20.0,
                 seed: int = 2) -> None:
        self.inner = inner
        self.url = inner.url
        self.attempts, self.base_s, self.max_backoff_s = attempts, base_s, max_backoff_s
        self._rng = random.Random(seed)

    def _call(self, name: str, *args: object) -> object:
        for attempt in range(self.attempts):
            try:
                return getattr(self.inner, name)(*args)
            except SlowDown:
                if attempt + 1 == self.attempts:
                    raise
                time.sleep(self._rng.uniform(0, min(self.max_backoff_s, self.base_s * 2**attempt)))
        raise AssertionError("unreachable")

    def __getattr__(self, name: str) -> Callable[..., object]:
        if name in ("list_ages", "iter_list", "list", "list_times"):
            return lambda prefix: self._listing(name, prefix)
        return lambda *args: self._call(name, *args)

    def _listing(self, name: str, prefix: str) -> object:
        # A listing that throttles part-way starts again (simple; the pages already read are counted).
        for attempt in range(self.attempts):
            try:
                result = list(self.inner.list_ages(prefix))
                break
            except SlowDown:
                if attempt + 1 == self.attempts:
                    raise
                time.sleep(self._rng.uniform(0, min(self.max_backoff_s, self.base_s * 2**attempt)))
        if name == "list_ages":
            return iter(result)
        if name == "iter_list":
            return iter([k for k, _ in result])
        if name == "list":
            return [k for k, _ in result]
        now = self.inner._now()
        return {k: now - age for k, age in result}
