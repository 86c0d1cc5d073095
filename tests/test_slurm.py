"""Slurm: the array template, the monitor and the finalizer on a real single-node Slurm cluster (Debian's
slurmctld, slurmd and munge, tests/slurm_cluster.py), with the stand-in as vLLM; then the pure parts (port
blocks, server URLs, the finalizer's verdict) row by row."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from olmocr.cluster.port_block import BLOCK, choose_block, slot_starts
from olmocr.cluster.ready import given_up, server_urls
from olmocr.pipeline.finalize import FINISHED, UNFINISHED, verdict
from tests.pipeline_helpers import Standins, assert_every_page_once, page_count, wait_for
from tests.sample_docs import write_text_pdf
from tests.slurm_cluster import DEBIAN_PACKAGES, SlurmCluster, missing_tools
from tests.standin_helpers import REPO_ROOT
from tests.tiers import require

pytestmark = [pytest.mark.xdist_group("slurm"), pytest.mark.slow]

SBATCH = REPO_ROOT / "deploy" / "slurm" / "olmocr.sbatch"
MONITOR = REPO_ROOT / "deploy" / "slurm" / "olmocr-monitor.sbatch"
FINALIZE = REPO_ROOT / "deploy" / "slurm" / "olmocr-finalize.sbatch"


@pytest.fixture(scope="module")
def cluster() -> Iterator[SlurmCluster]:
    missing = missing_tools()
    require(not missing, f"Slurm is not installed (missing {', '.join(missing)}): apt-get install {DEBIAN_PACKAGES}")
    require(os.geteuid() == 0, "the test Slurm cluster runs its daemons as root (SlurmUser=root): run as root")
    with SlurmCluster(cpus=8) as running:
        yield running


def _job_env(cluster: SlurmCluster, mark: str, **extra: str) -> dict[str, str]:
    """What the jobs get (sbatch exports the submitter's environment): the stand-in as vLLM, a private
    TMPDIR, and a mark to find every process they started."""
    tmp = cluster.dir / "tmp"
    tmp.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OLMOCR_", "SLURM_")) and k not in ("VLLM_API_KEY", "PYTHONPATH")}
    env.update({"OLMOCR_VLLM_BIN": str(REPO_ROOT / "scripts" / "vllm-standin"), "TMPDIR": str(tmp),
                "OLMOCR_TEST_MARK": mark}, **extra)
    return env


def _marked_processes(mark: str) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            if f"OLMOCR_TEST_MARK={mark}".encode() in environ.split(b"\0"):
                command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")[:200]
                found.append(f"{entry} {command!r}")
        except OSError:
            continue
    return found


def _docs(folder: Path, count: int, pages: int) -> list[Path]:
    folder.mkdir(parents=True)
    return [write_text_pdf(folder / f"report{i:02d}.pdf", pages) for i in range(count)]


def _wait_claimed(pipeline_log: Path, job_output: Path, timeout: float = 120) -> None:
    """Until the task's pipeline has claimed a work item (its log in the task's scratch directory)."""
    try:
        wait_for(lambda: pipeline_log.exists() and "claimed work item" in pipeline_log.read_text(), timeout,
                 "a claimed work item")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{_output(job_output)[-5000:]}") from None


def _output(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"({path} not written)"


def _pipeline_log(cluster: SlurmCluster, array: str, task: int) -> str:
    """The tails of a task's kept logs (OLMOCR_LOG_DIR's default: olmocr-logs/ARRAYJOB_TASK)."""
    logs = sorted((cluster.dir / "olmocr-logs" / f"{array}_{task}").rglob("*.log"))
    return "\n".join(f"--- {p.name}\n{_output(p)[-4000:]}" for p in logs) or "(no logs kept)"


@pytest.mark.timeout(420)

def _leases(ws: Path) -> list[str]:
    """The workspace's lease files (a local delete removes the folder with its last file)."""
    locks = ws / "worker_locks"
    return [p.name for p in locks.iterdir() if not p.name.startswith(".")] if locks.is_dir() else []

def test_array_cancelled_task_resubmitted_writes_every_page_once_and_finalizer_passes(cluster: SlurmCluster) -> None:
    docs = _docs(cluster.dir / "docs", 12, 2)
    ws = cluster.dir / "ws"
    mark = uuid.uuid4().hex
    # Slow answers (8 s a page) until task 1 is cancelled, so that the other tasks cannot finish everything
    # before task 1 (whose server may start later on a loaded machine) has claimed work; fast afterwards.
    control = cluster.dir / "standin-control.json"
    control.write_text(json.dumps({"latency": 8}))
    env = _job_env(cluster, mark, OLMOCR_STANDIN_CONTROL=str(control),
                   OLMOCR_PIPELINE_ARGS="--pages_per_group 2 --workers 2 --render_processes 1 --stop_timeout 10 "
                                        "--progress_interval 2")
    out = cluster.dir / "out"
    out.mkdir()
    array = cluster.sbatch("--array=0-2", "--cpus-per-task=1", f"--output={out}/task-%A_%a.out",
                           str(SBATCH), str(ws), *map(str, docs), env=env)
    monitor = cluster.sbatch("--cpus-per-task=1", f"--dependency=after:{array}", f"--output={out}/monitor.out",
                             str(MONITOR), str(ws), array,
                             env={**env, "OLMOCR_MONITOR_INTERVAL": "1", "OLMOCR_MONITOR_FILE": str(out / "stats.txt")})

    # Task 1 has claimed a work item: cancel it (Slurm's SIGTERM reaches every process of the task at once).
    wait_for(lambda: cluster.task_job_id(array, 1) is not None, 60, "task 1 split off")
    task1 = cluster.task_job_id(array, 1)
    task1_log = cluster.dir / "tmp" / f"olmocr-task-{task1}" / "pipeline.log"
    _wait_claimed(task1_log, out / f"task-{array}_1.out")
    cluster.run("scancel", f"{array}_1")
    control.write_text(json.dumps({"latency": 0.5}))
    records = cluster.wait_done(array, 240)
    states = {r["ArrayTaskId"]: r["JobState"] for r in records}
    if states != {"0": "COMPLETED", "1": "CANCELLED", "2": "COMPLETED"}:
        for t in range(3):  # whole, in the captured output: the assertion's repr below is cut short
            print(f"===== task {t}\n{_output(out / f'task-{array}_{t}.out')}")
            print(f"===== task {t} pipeline log\n{_pipeline_log(cluster, array, t)}")
    assert states == {"0": "COMPLETED", "1": "CANCELLED", "2": "COMPLETED"}, (
        states, [_output(out / f"task-{array}_{t}.out")[-3000:] for t in range(3)])
    # Fill once: the array's first task listed and queued the 12 inputs; the others never listed them, they
    # waited for its queue (--wait_for_queue) and took work from it.
    kept = {t: _output(cluster.dir / "olmocr-logs" / f"{array}_{t}" / "pipeline.log") for t in range(3)}
    assert [t for t in range(3) if "found 12 documents" in kept[t]] == [0], kept
    assert "the first task: adding the 12 inputs to the queue" in _output(out / f"task-{array}_0.out")
    for t in (1, 2):
        text = _output(out / f"task-{array}_{t}.out")
        assert f"task {array}_0 adds the inputs: waiting up to 1800 s" in text, text
        assert "claimed work item" in kept[t], kept[t]
    cancelled = kept[1]
    assert "SIGTERM: stopping gracefully" in cancelled, cancelled
    assert "second SIGTERM" not in cancelled  # the script did not signal it again: its work was handed back
    assert "handed back unfinished" in cancelled, cancelled
    assert "passing TERM on" not in _output(out / f"task-{array}_1.out")  # scancel's SIGTERM reached it directly

    # Several tasks on one node: each had its own block of ports, and they ran at the same time.
    ports = []
    for task in range(3):
        text = _output(out / f"task-{array}_{task}.out")
        found = re.search(r"server port (\d+), status port (\d+)", text)
        assert found, text
        ports.append((int(found[1]), int(found[2])))
    assert len({p for pair in ports for p in pair}) == 6, ports
    assert "servers ready: http://127.0.0.1:" in _output(out / f"task-{array}_0.out")

    # The cancelled task, submitted again, finishes what it handed back.
    again = cluster.sbatch("--array=1", "--cpus-per-task=1", f"--output={out}/again-%A_%a.out",
                           str(SBATCH), str(ws), env=env)
    final = cluster.sbatch("--cpus-per-task=1", f"--dependency=afterany:{array}:{again}",
                           f"--output={out}/finalize.out", str(FINALIZE), str(ws), env=env)
    (again_record,) = cluster.wait_done(again, 180)
    assert again_record["JobState"] == "COMPLETED", _output(out / f"again-{again}_1.out")
    (final_record,) = cluster.wait_done(final, 60)
    report = _output(out / "finalize.out")
    assert (final_record["JobState"], final_record["ExitCode"]) == ("COMPLETED", "0:0"), report
    assert "FINISHED: all 12 work items done, 12 documents, 24 pages" in report, report

    assert_every_page_once(ws, docs)
    assert sum(page_count(d) for d in docs) == 24
    (monitor_record,) = cluster.wait_done(monitor, 60)
    assert monitor_record["JobState"] == "COMPLETED", _output(out / "monitor.out")
    stats = _output(out / "stats.txt")
    assert "Work items: 12 total" in stats and f"job {array}" in stats, stats
    assert not list((cluster.dir / "tmp").iterdir()), "a task left its scratch directory"
    assert (cluster.dir / "olmocr-logs" / f"{array}_0" / "server" / "vllm.log").exists()
    wait_for(lambda: not _marked_processes(mark), 30, "every process of the jobs gone")


@pytest.mark.timeout(240)
def test_time_limit_warning_stops_the_task_and_requeues_it_while_work_is_left(cluster: SlurmCluster) -> None:
    docs = _docs(cluster.dir / "docs-usr1", 6, 2)
    ws = cluster.dir / "ws-usr1"
    mark = uuid.uuid4().hex
    env = _job_env(cluster, mark, OLMOCR_STANDIN_LATENCY="1.5",
                   OLMOCR_PIPELINE_ARGS="--pages_per_group 2 --workers 1 --render_processes 1 --stop_timeout 10")
    out = cluster.dir / "out-usr1"
    out.mkdir()
    # No workspace: the finalizer says so (exit 2).
    early = cluster.sbatch("--cpus-per-task=1", f"--output={out}/early.out", str(FINALIZE), str(ws / "missing"),
                           env=env)
    (early_record,) = cluster.wait_done(early, 60)
    assert early_record["ExitCode"] == "2:0" and "no workspace at" in _output(out / "early.out")

    job = cluster.sbatch("--cpus-per-task=1", f"--output={out}/task.out", str(SBATCH), str(ws), *map(str, docs),
                         env=env)
    task_log = cluster.dir / "tmp" / f"olmocr-task-{job}" / "pipeline.log"
    _wait_claimed(task_log, out / "task.out")
    # What --signal=B:USR1@300 sends before the time limit: to the batch script only.
    cluster.run("scancel", "--batch", "--signal=USR1", job)
    wait_for(lambda: [(r.get("Restarts"), r.get("JobState")) for r in cluster.job_fields(job)] == [("1", "PENDING")],
             90, f"the task requeued itself\n{_output(out / 'task.out')}")
    # Slurm holds a requeued job for about 2 minutes so that the old run is gone from the node before the new one
    # (same job id) starts: wait for exactly that, then let it start.
    wait_for(lambda: not cluster.job_steps_running(job), 60, "the first run's steps gone")
    time.sleep(2)
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    text = _output(out / "task.out")
    assert "USR1: stopping gracefully" in text and "requeueing job" in text, text
    try:
        (record,) = cluster.wait_done(job, 150)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{_output(out / 'task.out')}\n{cluster.logs()}") from None
    logs = cluster.dir / "olmocr-logs" / f"{job}_0"
    assert record["JobState"] == "COMPLETED", (
        f"{record.get('JobState')} {record.get('ExitCode')} {record.get('Reason')}\n"
        f"{_output(out / 'task.out')[-5000:]}\n{_output(logs / 'manager.log')[-3000:]}\n"
        f"{_output(logs / 'server' / 'vllm.log')[-2000:]}\n{cluster.logs()}")
    assert_every_page_once(ws, docs)
    wait_for(lambda: not _marked_processes(mark), 30, "every process of the job gone")


@pytest.mark.timeout(180)
def test_term_to_the_batch_script_alone_is_passed_on_and_the_finalizer_fails_on_what_is_left(
        cluster: SlurmCluster) -> None:
    docs = _docs(cluster.dir / "docs-term", 6, 2)
    ws = cluster.dir / "ws-term"
    mark = uuid.uuid4().hex
    env = _job_env(cluster, mark, OLMOCR_STANDIN_LATENCY="2",
                   OLMOCR_PIPELINE_ARGS="--pages_per_group 2 --workers 1 --render_processes 1 --stop_timeout 10")
    out = cluster.dir / "out-term"
    out.mkdir()
    job = cluster.sbatch("--cpus-per-task=1", f"--output={out}/task.out", str(SBATCH), str(ws), *map(str, docs),
                         env=env)
    task_log = cluster.dir / "tmp" / f"olmocr-task-{job}" / "pipeline.log"
    _wait_claimed(task_log, out / "task.out")
    # What --signal=B:TERM@120 sends: SIGTERM to the batch script only; the pipeline must get it from there.
    cluster.run("scancel", "--batch", "--signal=TERM", job)
    (record,) = cluster.wait_done(job, 90)
    text = _output(out / "task.out")
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), text
    assert "passing TERM on to the pipeline" in text and "SIGTERM: stopping gracefully" in text, text
    assert "second SIGTERM" not in text and "handed back unfinished" in text, text
    assert not _leases(ws)  # leases handed back
    final = cluster.sbatch("--cpus-per-task=1", f"--output={out}/finalize.out", str(FINALIZE), str(ws), env=env)
    (final_record,) = cluster.wait_done(final, 60)
    report = _output(out / "finalize.out")
    assert (final_record["JobState"], final_record["ExitCode"]) == ("FAILED", "1:0"), report
    assert "UNFINISHED: " in report and "work items never done" in report, report
    wait_for(lambda: not _marked_processes(mark), 30, "every process of the job gone")


@pytest.mark.timeout(180)
def test_a_task_whose_server_manager_dies_hands_its_work_back_and_fails(cluster: SlurmCluster) -> None:
    docs = _docs(cluster.dir / "docs-lost", 6, 2)
    ws = cluster.dir / "ws-lost"
    mark = uuid.uuid4().hex
    env = _job_env(cluster, mark, OLMOCR_STANDIN_LATENCY="2",
                   OLMOCR_PIPELINE_ARGS="--pages_per_group 2 --workers 1 --render_processes 1 --stop_timeout 10")
    out = cluster.dir / "out-lost"
    out.mkdir()
    job = cluster.sbatch("--cpus-per-task=1", f"--output={out}/task.out", str(SBATCH), str(ws), *map(str, docs),
                         env=env)
    task_log = cluster.dir / "tmp" / f"olmocr-task-{job}" / "pipeline.log"
    _wait_claimed(task_log, out / "task.out")
    (manager,) = [int(p.split()[0]) for p in _marked_processes(mark) if "olmocr.vllm_server_manager" in p]
    os.kill(manager, signal.SIGKILL)  # its supervisord stops the server (PR_SET_PDEATHSIG)
    (record,) = cluster.wait_done(job, 90)
    text = _output(out / "task.out")
    assert (record["JobState"], record["ExitCode"]) == ("FAILED", "1:0"), text
    assert "the server manager exited: stopping the pipeline" in text and "handed back unfinished" in text, text
    assert not _leases(ws)
    wait_for(lambda: not _marked_processes(mark), 30, "every process of the job gone")


@pytest.mark.timeout(180)
def test_fleet_dir_gives_a_task_the_servers_other_nodes_listed(cluster: SlurmCluster,
                                                               standins: Standins) -> None:
    docs = _docs(cluster.dir / "docs-fleet", 6, 2)
    ws = cluster.dir / "ws-fleet"
    fleet = cluster.dir / "fleet"
    fleet.mkdir()
    mark = uuid.uuid4().hex
    # A server "on another node": a stand-in listed in the fleet directory as another task would list it.
    other = standins(OLMOCR_STANDIN_LATENCY=0.5)
    (fleet / "99999_0").write_text(other.url + "\n")  # a job id no test of this cluster reaches
    env = _job_env(cluster, mark, OLMOCR_STANDIN_LATENCY="0.5", OLMOCR_FLEET_DIR=str(fleet),
                   OLMOCR_ADVERTISE_HOST="127.0.0.1",
                   OLMOCR_PIPELINE_ARGS="--pages_per_group 2 --workers 4 --render_processes 1")
    out = cluster.dir / "out-fleet"
    out.mkdir()
    job = cluster.sbatch("--cpus-per-task=1", f"--output={out}/task.out", str(SBATCH), str(ws),
                         *map(str, docs), env=env)
    (record,) = cluster.wait_done(job, 150)
    text = _output(out / "task.out")
    assert record["JobState"] == "COMPLETED", text
    own = re.search(r"servers ready: (http://127.0.0.1:\d+)", text)
    assert own, text
    assert f"fleet ({fleet}): " in text and other.url in text, text
    assert [p.name for p in fleet.iterdir()] == ["99999_0"]  # the task's own entry is gone with it
    stats = cluster.run(sys.executable, "-m", "olmocr.pipeline", str(ws), "--stats").stdout
    for url in (own[1], other.url):
        found = re.search(rf"{re.escape(url)}: (\d+) answers", stats)  # --stats counts answers per server
        assert found and int(found[1]) > 0, stats
    assert_every_page_once(ws, docs)
    wait_for(lambda: not _marked_processes(mark), 30, "every process of the job gone")


# ---- the pure parts ---------------------------------------------------------------------------------------


def test_port_blocks_follow_the_job_id_and_skip_taken_ports() -> None:
    starts = list(slot_starts(7))
    assert starts[0] == 20000 + 7 * BLOCK and len(set(starts)) == len(starts)
    # Tasks with neighbouring job ids (an array's) get disjoint blocks.
    blocks = [choose_block(seed, 4, lambda p: True) for seed in (100, 101, 102)]
    assert blocks[1] - blocks[0] == blocks[2] - blocks[1] == BLOCK
    # A taken port (a server's, the status service's) moves the task to the next block.
    first = choose_block(100, 4, lambda p: True)
    assert first is not None
    assert choose_block(100, 4, lambda p: p != first + 2) == first + BLOCK
    assert choose_block(100, 4, lambda p: p != first + BLOCK - 1) == first + BLOCK
    assert choose_block(100, 4, lambda p: p != first + 5) == first  # not used by 4 servers
    assert choose_block(100, 1, lambda p: False) is None
    with pytest.raises(ValueError):
        choose_block(1, BLOCK - 1, lambda p: True)


def test_server_urls_and_give_up_from_the_status_json() -> None:
    assert server_urls({"healthy": True, "port": 30024}) == ["http://127.0.0.1:30024"]
    several = {"healthy": True, "port": 30024, "servers": [{"port": 30024}, {"port": 30025}]}
    assert server_urls(several) == ["http://127.0.0.1:30024", "http://127.0.0.1:30025"]
    assert server_urls({"servers": [{"url": "http://127.0.0.1:30030", "port": 30030}]}) == ["http://127.0.0.1:30030"]
    assert given_up({"gave_up": True, "last_failure_reason": "crash loop"}) == "crash loop"
    assert given_up({"servers": [{"state": "RUNNING"}, {"state": "FATAL"}]}) == "a server failed to start"
    assert given_up({"state": "STARTING"}) is None


def _stats(total: int, done: int, leased: int = 0, failed: list[dict] | None = None) -> dict:
    return {"items": {"total": total, "done": done, "leased": leased, "pending": total - done - leased},
            "documents": done, "pages": 2 * done, "failed_documents": failed or []}


@pytest.mark.parametrize(("stats", "code", "words"), [
    (_stats(4, 4), FINISHED, "FINISHED: all 4 work items done, 4 documents, 8 pages"),
    (_stats(4, 4, failed=[{"source": "a.pdf", "reason": "corrupt", "retryable": False}]), FINISHED,
     "1 documents failed for good"),
    (_stats(4, 3), UNFINISHED, "1 work items never done"),
    (_stats(4, 3, leased=1), UNFINISHED, "1 work items still leased"),
    (_stats(4, 4, failed=[{"source": "a.pdf", "reason": "server errors", "retryable": True}]), UNFINISHED,
     "1 documents failed for a reason a rerun retries"),
    (_stats(0, 0), UNFINISHED, "nothing was ever added"),
])
def test_finalizer_verdict(stats: dict, code: int, words: str) -> None:
    result = verdict(stats)
    assert result.exit_code == code and words in result.line, result


def test_sbatch_templates_ask_for_no_gpus_and_stop_gracefully() -> None:
    for path in (SBATCH, MONITOR, FINALIZE):
        directives = [line for line in path.read_text().splitlines() if line.startswith("#SBATCH")]
        assert directives and not [d for d in directives if "--gres" in d or "--gpus" in d], path
    text = SBATCH.read_text()
    assert "#SBATCH --signal=B:USR1@300" in text and "#SBATCH --requeue" in text
