"""Queueing streams (issue 29): paths are consumed as they are listed, appended in chunks before the listing
ends, duplicates are skipped without holding every path, and memory does not grow with the paths' strings.
Against the in-process store with S3's conditional writes (bench/scale_store.py); figures at 1M and 10M
keys are in bench/RESULTS.md (scale)."""

from __future__ import annotations

import os
import random
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.scale_store import CountingStore, MemoryStore
from olmocr.pipeline.workspace import index_stream
from olmocr.pipeline.workspace.inputs import InputProblem, iter_inputs
from olmocr.pipeline.workspace.queue import INDEX_KEY, WorkQueue, encode_index, group_hash, load_index

pytestmark = pytest.mark.timeout(240)


def _path(i: int) -> str:
    return f"s3://corpus/collections/{i // 1000:04d}/{i * 2654435761 % 2**32:08x}-{i:07d}.pdf"


def _queued(store: MemoryStore) -> list[str]:
    return [p for paths in load_index(store).values() for p in paths]  # type: ignore[arg-type]


def _sample(path: str) -> int:
    return 10


def test_chunks_are_appended_before_the_listing_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_stream, "WINDOW", 1000)
    store = MemoryStore()
    seen_midway: list[int] = []

    def listing() -> Iterator[str]:
        for i in range(5000):
            if i == 2500:  # half listed: what is queued already?
                seen_midway.append(len(_queued(store)) if store.read(INDEX_KEY) else 0)
            yield _path(i)

    added = WorkQueue(store).populate(listing(), pages_per_group=100, sample_count=_sample)
    assert seen_midway and seen_midway[0] >= 1000, seen_midway  # the first window was queued already
    queued = _queued(store)
    assert sorted(queued) == sorted(_path(i) for i in range(5000)) and added == 500


def test_duplicates_are_skipped_within_the_input_and_against_the_index(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_stream, "WINDOW", 700)
    store = MemoryStore()
    old = {group_hash([_path(i)]): (_path(i),) for i in range(0, 3000, 3)}  # queued by an older run
    store.put_direct(INDEX_KEY, encode_index(old))

    def twice() -> Iterator[str]:  # every path twice, in two passes: the repeats are windows apart
        for _ in range(2):
            yield from (_path(i) for i in range(3000))

    WorkQueue(store).populate(twice(), pages_per_group=100, sample_count=_sample)
    queued = _queued(store)
    assert len(queued) == len(set(queued)) == 3000
    assert WorkQueue(store).populate(twice(), pages_per_group=100, sample_count=_sample) == 0
    assert len(_queued(store)) == 3000


def test_concurrent_streaming_populators_lose_nothing_and_queue_nothing_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_stream, "WINDOW", 400)
    store = CountingStore(MemoryStore(), latency_s=0.002)  # writes take time: appends collide
    wanted = [[_path(i) for i in range(j * 1500, j * 1500 + 4000)] for j in range(4)]  # overlapping inputs
    for paths in wanted:
        random.Random(len(paths)).shuffle(paths)
    errors: list[BaseException] = []

    def run(paths: list[str]) -> None:
        try:
            WorkQueue(store).populate(iter(paths), pages_per_group=50, sample_count=_sample)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(p,)) for p in wanted]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=200)
    assert not errors
    queued = _queued(store.inner)
    assert len(queued) == len(set(queued)), f"{len(queued) - len(set(queued))} paths queued twice"
    assert set(queued) == {p for paths in wanted for p in paths}
    assert store.requests["PUT"] > 4 * 2  # several chunks each, and some writes lost their race


def _peak_queueing(n: int) -> int:
    store = MemoryStore()
    tracemalloc.start()
    try:
        WorkQueue(store).populate((_path(i) for i in range(n)), pages_per_group=500, sample_count=_sample)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        assert len(_queued(store)) == n


def test_memory_grows_by_bytes_a_path_not_by_the_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Peak Python allocations of queueing 100,000 paths listed one by one against 10,000: under 60 bytes
    more a path (measured: 43: the index as stored, about three times while it is rewritten, and an
    8-byte hash).
    Holding the paths' strings would cost over 110 bytes a path."""
    monkeypatch.setattr(index_stream, "WINDOW", 5000)
    small, big = _peak_queueing(10_000), _peak_queueing(100_000)
    per_path = (big - small) / 90_000
    assert per_path < 60, f"{per_path:.0f} bytes a path (peaks {small / 1e6:.1f} and {big / 1e6:.1f} MB)"


def _read_offset(path: Path) -> int | None:
    """Where this process's open descriptor on ``path`` reads next (None: not open)."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
                    if line.startswith("pos:"):
                        return int(line.split()[1])
        except OSError:
            continue
    return None


def test_a_list_file_of_many_paths_is_read_as_it_is_queued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A list of 200,000 S3 paths (with comments and blank lines): read a block at a time, taken as named
    (no request per path: the S3 endpoint here is closed), queued whole."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # any request would fail
    monkeypatch.setattr(index_stream, "WINDOW", 20_000)
    n = 200_000
    listing = tmp_path / "paths.txt"
    with listing.open("w") as f:
        f.write("# ten million in production\n\n")
        f.writelines(f"{_path(i)}\n" for i in range(n))
    problems: list[InputProblem] = []
    stream = iter_inputs([str(listing)], problems)
    first = next(stream)
    offset = _read_offset(listing)
    assert offset is not None and offset < listing.stat().st_size / 10, (offset, listing.stat().st_size)
    store = MemoryStore()
    WorkQueue(store).populate(_chain(first, stream), pages_per_group=500, sample_count=_sample)
    assert problems == []
    queued = _queued(store)
    assert len(queued) == n and set(queued) == {_path(i) for i in range(n)}


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def test_a_new_workspace_is_queued_with_two_writes_and_nothing_read() -> None:
    """As upstream's GET + PUT of the index: a create of the index and one of the page counts (the sample's
    reads are the caller's), no GET, no LIST of failed/ (a new workspace has no failures)."""
    store = CountingStore(MemoryStore())
    WorkQueue(store).populate((_path(i) for i in range(5000)), pages_per_group=100, sample_count=_sample)
    assert dict(store.requests) == {"PUT": 2}
    assert len(_queued(store.inner)) == 5000
