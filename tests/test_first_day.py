"""A new user's first day (#28), the pipeline's side: a run that fails every page, the start-up wait, a host
name that does not resolve, a workspace with nothing queued. Real processes: the pipeline CLI and the
stand-in on loopback (its ``answer: garbage`` fault plays a wrong model behind the name ``olmocr``, its
``load_delay`` a server still loading its model).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from olmocr.pipeline.progress import FailFast
from olmocr.pipeline.servers.checks import DEFAULT_READY_WAIT_S, ready_delays
from olmocr.pipeline.workspace.queue import DONE_DIR, FAILED_DIR, INDEX_KEY, LOCKS_DIR, RESULTS_DIR
from tests.pipeline_helpers import RESILIENCE_DOCS, SMALL_DOCS, Standins, run_pipeline, running_pipeline
from tests.test_mistakes import assert_one_line, run_cli

pytestmark = pytest.mark.timeout(180)


# ------------------------------------------------------------------------------ the rule, row by row


def test_the_default_wait_is_ten_attempts_at_most_60s_apart_and_a_larger_timeout_extends_it() -> None:
    default = ready_delays()
    assert len(default) + 1 == 10 and max(default) == 60 and sum(default) == DEFAULT_READY_WAIT_S == 243
    assert ready_delays(243) == default  # the flag's default is the same schedule
    longer = ready_delays(1200)
    assert sum(longer) == 1200 and max(longer) == 60 and longer[:9] == default
    shorter = ready_delays(30)
    assert sum(shorter) == 30 and shorter[:4] == [1, 2, 4, 8]
    assert ready_delays(0) == []  # one attempt, no wait


@pytest.mark.parametrize("verdicts,pages,trips_at", [
    (["bad"] * 50, 50, 48),  # 95% of 50 = 47.5: the 48th failure decides it
    (["bad"] * 47 + [None] * 3, 50, None),  # 94%: not doomed
    ([None] * 3 + ["bad"] * 47, 50, None),  # the same, in another order
    (["a", "b"] * 25, 50, None),  # failing, but not the same way: not this rule
    ([None] * 50 + ["bad"] * 100, 50, None),  # later pages never count: a run that started well goes on
    (["bad"] * 50, 0, None),  # OLMOCR_FAIL_FAST_PAGES=0: off
    (["bad"] * 10, 10, 10),
])
def test_fail_fast_trips_when_nearly_every_early_page_fails_the_same_way(verdicts: list[str | None], pages: int,
                                                                         trips_at: int | None) -> None:
    rule = FailFast(pages=pages, share=0.95)
    tripped = [i + 1 for i, v in enumerate(verdicts) if rule.record(v) is not None]
    assert (tripped[0] if tripped else None) == trips_at, tripped[:3]


# ------------------------------------------------------------------------------ a run that fails every page


def test_a_server_answering_garbage_stops_the_run_early_with_one_line_and_exit_1(tmp_path: Path, standins: Standins) -> None:
    standin = standins(OLMOCR_STANDIN_ANSWER="garbage")
    ws = tmp_path / "ws"
    rc, log = run_pipeline(ws, standin.url, RESILIENCE_DOCS, "--max_page_retries", "2", "--workers", "2",
                           env={"OLMOCR_FAIL_FAST_PAGES": "6"}, log=tmp_path / "run.log")
    assert rc == 1, log[-3000:]
    line = assert_one_line(log, "stopping the run", "failed the same way", "OLMOCR_FAIL_FAST_PAGES=0")
    assert "6 of the first 6 pages" in line and "no usable model answer" in line, line
    assert "Traceback" not in log
    # Stopped early: far fewer than the 23 pages were tried, and nothing was marked done or failed -- the
    # items are handed back for the run that follows the fix.
    assert 6 <= log.count("no usable answer after 2 attempts") < 23, log[-3000:]
    for kept in (DONE_DIR, FAILED_DIR, RESULTS_DIR, LOCKS_DIR):
        assert not [p for p in (ws / kept).rglob("*") if p.is_file()], kept
    assert (ws / INDEX_KEY).is_file()  # the queue stays, for the next run


def test_a_run_that_wrote_nothing_exits_1_even_without_the_early_stop(tmp_path: Path, standins: Standins) -> None:
    standin = standins(OLMOCR_STANDIN_ANSWER="garbage")
    rc, log = run_pipeline(tmp_path / "ws", standin.url, SMALL_DOCS[:2], "--max_page_retries", "1",
                           env={"OLMOCR_FAIL_FAST_PAGES": "0"}, log=tmp_path / "run.log")
    assert rc == 1, log[-3000:]
    assert_one_line(log, "nothing written", "documents this run finished failed", "--stats")
    assert "stopping the run" not in log


def test_a_run_given_only_broken_files_exits_0_they_failed_for_good(tmp_path: Path, standins: Standins) -> None:
    broken = [tmp_path / "a.pdf", tmp_path / "b.pdf"]
    for path in broken:
        path.write_bytes(b"this is not a PDF at all\n" * 20)
    standin = standins()
    rc, log = run_pipeline(tmp_path / "ws", standin.url, broken, log=tmp_path / "run.log")
    assert rc == 0, log[-3000:]
    assert "0 documents written, 2 failed" in log and "nothing written" not in log, log[-3000:]


def test_a_healthy_run_is_not_stopped(tmp_path: Path, standins: Standins) -> None:
    standin = standins(OLMOCR_STANDIN_ANSWER="mixed:3")  # every 3rd answer garbage
    rc, log = run_pipeline(tmp_path / "ws", standin.url, SMALL_DOCS[:3], env={"OLMOCR_FAIL_FAST_PAGES": "4"},
                           log=tmp_path / "run.log")
    assert rc == 0, log[-3000:]
    assert "stopping the run" not in log and "nothing written" not in log


# ------------------------------------------------------------------------------ the start-up wait


SCALE = "0.01"  # OLMOCR_READY_WAIT_SCALE: 1200 s of wait become 12 s; a 400 s model load, 4 s


def test_a_larger_ready_timeout_waits_out_a_long_model_load_and_the_first_line_says_so(tmp_path: Path, standins: Standins) -> None:
    server = standins(OLMOCR_STANDIN_LOAD_DELAY=4, ready=False)  # still loading its model
    rc, log = run_pipeline(tmp_path / "ws", server.url, SMALL_DOCS[:1],
                           "--max_server_ready_timeout", "1200", env={"OLMOCR_READY_WAIT_SCALE": SCALE},
                           log=tmp_path / "run.log")
    assert rc == 0, log[-3000:]
    first = assert_one_line(log, "waiting for the vLLM server", "--max_server_ready_timeout")
    assert "attempts over 12s" in first, first  # 1200 s scaled: the real wait, not the default's 243 s


def test_the_default_wait_gives_up_on_a_load_longer_than_243s(tmp_path: Path, standins: Standins) -> None:
    server = standins(OLMOCR_STANDIN_LOAD_DELAY=4, ready=False)  # still loading its model
    rc, log = run_pipeline(tmp_path / "ws", server.url, SMALL_DOCS[:1],
                           env={"OLMOCR_READY_WAIT_SCALE": SCALE}, log=tmp_path / "run.log")
    assert rc == 1, log[-3000:]
    first = assert_one_line(log, "waiting for the vLLM server", "up to 10 attempts")
    assert "over 2s" in first, first  # 243 s scaled
    assert_one_line(log, "Cannot reach the vLLM server", "after 10 attempts", "--max_server_ready_timeout")


# ------------------------------------------------------------------------------ definite answers, at once


def test_a_host_name_that_does_not_resolve_fails_in_seconds(tmp_path: Path) -> None:
    started = time.monotonic()
    rc, out, _ = run_cli([str(tmp_path / "ws"), "--vllm-url", "http://locahlost:30024", "--pdfs",
                          str(SMALL_DOCS[0])])
    took = time.monotonic() - started
    assert rc == 1, out
    assert_one_line(out, "'locahlost' does not resolve", "--vllm-url")
    assert "waiting for the vLLM server" not in out and took < 20, (took, out)


def test_a_fresh_workspace_without_pdfs_is_one_line_exit_2_and_leaves_no_directory(tmp_path: Path) -> None:
    ws = tmp_path / "new" / "ws"
    rc, out, took = run_cli([str(ws), "--vllm-url", "http://127.0.0.1:9"])
    assert rc == 2, out
    assert_one_line(out, f"workspace {ws}", "nothing has been queued there yet", "--pdfs")
    assert "0 of 0" not in out and not (tmp_path / "new").exists() and took < 20


def test_a_dns_name_without_an_address_yet_is_waited_for(tmp_path: Path, standins: Standins) -> None:
    """A headless Service has no address until its first server pod is ready (the Kubernetes Job's case)."""
    hosts = tmp_path / "hosts"
    hosts.write_text("")  # no server ready yet
    standin = standins()
    with running_pipeline(tmp_path / "ws", f"dns+http://olmocr-server:{standin.port}", SMALL_DOCS[:1],
                          "--max_server_ready_timeout", "1200", log=tmp_path / "run.log",
                          env={"OLMOCR_HOSTS_FILE": str(hosts), "OLMOCR_READY_WAIT_SCALE": SCALE}) as run:
        run.wait_log("waiting for a vLLM server behind dns+http://olmocr-server", 30)
        time.sleep(1.5)
        hosts.write_text("127.0.0.1 olmocr-server\n")  # the first pod is ready
        rc = run.wait(90)
        log = run.output()
    assert rc == 0, log[-3000:]
    assert_one_line(log, "waiting for a vLLM server behind", "attempts over 12s", "--max_server_ready_timeout")
