"""Storage semantics on a local directory and on a real S3 API (moto server on 127.0.0.1)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from olmocr.pipeline.workspace.storage import Storage, open_storage
from tests.s3_helpers import S3Server


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return open_storage(str(tmp_path / "ws"))
    server: S3Server = request.getfixturevalue("s3_server")
    return open_storage(server.url("some/prefix"))


def test_basic_operations(storage: Storage) -> None:
    assert storage.read("a/b.txt") is None
    assert storage.read_versioned("a/b.txt") is None
    assert storage.create("a/b.txt", b"one")
    assert not storage.create("a/b.txt", b"two")
    data, tag = storage.read_versioned("a/b.txt") or (b"", "")
    assert data == b"one"
    assert storage.replace_if("a/b.txt", b"three", tag)
    assert not storage.replace_if("a/b.txt", b"four", tag)
    assert storage.read("a/b.txt") == b"three"
    assert not storage.replace_if("missing.txt", b"x", tag)
    storage.write("results/output_1.jsonl", b"{}\n")
    storage.write("results/output_1.jsonl", b"{}\n{}\n")
    assert storage.read("results/output_1.jsonl") == b"{}\n{}\n"
    assert storage.list("results/") == ["results/output_1.jsonl"]
    assert storage.list("") == ["a/b.txt", "results/output_1.jsonl"]
    storage.delete("a/b.txt")
    storage.delete("a/b.txt")
    assert storage.read("a/b.txt") is None
    with pytest.raises(ValueError):
        storage.read("../escape")


def _race(n: int, action) -> list[bool]:
    results: list[bool] = [False] * n
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        barrier.wait(timeout=30)
        results[i] = action(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_create_is_exclusive_under_contention(storage: Storage) -> None:
    for round_ in range(3):
        key = f"locks/k{round_}"
        won = _race(8, lambda i, key=key: storage.create(key, f"writer {i}".encode()))
        assert sum(won) == 1
        assert storage.read(key) == f"writer {won.index(True)}".encode()


def test_replace_if_is_compare_and_swap_under_contention(storage: Storage) -> None:
    storage.write("counter", b"0")
    _, tag = storage.read_versioned("counter") or (b"", "")
    won = _race(8, lambda i: storage.replace_if("counter", f"v{i}".encode(), tag))
    assert sum(won) == 1
    assert storage.read("counter") == f"v{won.index(True)}".encode()


def test_conditional_reads_and_ages(storage: Storage) -> None:
    """Issue 29: a conditional GET costs no body when nothing changed; ages come from the store's clock."""
    import time

    from olmocr.pipeline.workspace.storage import NOT_MODIFIED

    assert storage.read_if_changed("idx", None) is None
    assert storage.stat("idx") is None and storage.read_aged("idx") is None
    storage.write("idx", b"version one")
    found = storage.read_if_changed("idx", None)
    assert isinstance(found, tuple) and found[0] == b"version one"
    tag = found[1]
    assert storage.read_if_changed("idx", tag) is NOT_MODIFIED
    storage.write("idx", b"version two")
    again = storage.read_if_changed("idx", tag)
    assert isinstance(again, tuple) and again[0] == b"version two" and again[1] != tag
    stat = storage.stat("idx")
    aged = storage.read_aged("idx")
    assert stat is not None and aged is not None and stat[0] == again[1] == aged[1]
    assert 0 <= stat[1] < 3 and aged[0] == b"version two"
    time.sleep(2.2)
    later = storage.stat("idx")
    assert later is not None and 1 <= later[1] < 5  # it aged by the store's clock (whole seconds on S3)
    ages = dict(storage.list_ages(""))
    assert set(ages) == {"idx"} and 1 <= ages["idx"] < 5
    assert list(storage.iter_list("")) == ["idx"]


def test_a_local_delete_leaves_no_empty_folder_behind(tmp_path: Path) -> None:
    """As on S3, which has no folders: a removed job's upload folder goes with its last file (a million removed
    jobs would otherwise leave a million empty folders for every listing to walk). The root and the top-level
    folders stay."""
    root = tmp_path / "ws"
    storage = open_storage(str(root))
    storage.write("service/uploads/j1/0-a.pdf", b"a")
    storage.write("service/uploads/j1/1-b.pdf", b"b")
    storage.write("service/jobs/j1.json", b"{}")
    storage.delete("service/uploads/j1/0-a.pdf")
    assert (root / "service/uploads/j1").is_dir()  # still holds a file
    storage.delete("service/uploads/j1/1-b.pdf")
    assert not (root / "service/uploads").exists() and (root / "service/jobs").is_dir()
    storage.delete("service/jobs/j1.json")
    assert [p.name for p in root.iterdir()] == ["service"] and list((root / "service").iterdir()) == []
    storage.write("worker_locks/worker_a.lock", b"{}")
    storage.delete("worker_locks/worker_a.lock")
    assert (root / "worker_locks").is_dir()
    storage.write("service/uploads/j1/0-a.pdf", b"again")  # the folders are made again
    assert storage.list("service/") == ["service/uploads/j1/0-a.pdf"]


def test_local_writes_and_deletes_racing_in_one_folder_all_succeed(tmp_path: Path) -> None:
    """A delete that empties a folder removes it while other threads write into it: every write still lands."""
    storage = open_storage(str(tmp_path / "ws"))

    def churn(i: int) -> bool:
        for n in range(150):
            key = f"x/y/{i}-{n}"
            storage.write(key, b"z")
            if storage.read(key) != b"z":
                return False
            storage.delete(key)
        return True

    assert all(_race(4, churn))
    assert storage.list("x/") == []
