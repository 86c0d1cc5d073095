"""A real single-node Slurm cluster for tests: Debian's munged, slurmctld and slurmd, configured in a
private directory (``SLURM_CONF``), on free ports, stopped by pid at the end.

Nothing outside the directory is written: munged gets its own key, socket, pid, log and seed files there
(its ``--key-file``/``--socket``/... options), Slurm finds munged through ``AuthInfo=socket=...``, and
every state, spool, pid and log path of the daemons is in the directory. Needs root (SlurmUser=root:
CI runs as root) and the Debian packages slurmctld, slurmd, slurm-client and munge.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REQUIRED_TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scancel", "scontrol")
DEBIAN_PACKAGES = "slurmctld slurmd slurm-client munge"


def missing_tools() -> list[str]:
    return [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None
            and not os.path.exists(f"/usr/sbin/{tool}")]


def _tool(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class SlurmCluster:
    """``with SlurmCluster(cpus=8) as cluster: cluster.sbatch(...)``."""

    cpus: int = 8
    kill_wait: int = 30
    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="olmocr-slurm-")))
    node: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.dir / "slurm.conf"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def write_config(self) -> None:
        for sub in ("state", "spool", "munge"):
            (self.dir / sub).mkdir(mode=0o700, exist_ok=True)
        ctld_port, slurmd_port = _free_ports(2)
        self.conf.write_text(f"""\
# Single-node test cluster (tests/slurm_cluster.py); everything lives in {self.dir}.
ClusterName=olmocrtest
SlurmctldHost={self.node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.dir}/munge/munge.socket
StateSaveLocation={self.dir}/state
SlurmdSpoolDir={self.dir}/spool
SlurmctldPidFile={self.dir}/slurmctld.pid
SlurmdPidFile={self.dir}/slurmd.pid
SlurmctldLogFile={self.dir}/slurmctld.log
SlurmdLogFile={self.dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
KillWait={self.kill_wait}
MinJobAge=3600
SchedulerParameters=sched_interval=1
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")

    def start(self) -> SlurmCluster:
        self.write_config()
        munge = self.dir / "munge"
        key = munge / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        self._start("munged", [_tool("munged"), "--force", f"--key-file={key}", f"--socket={munge}/munge.socket",
                               f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
                               f"--seed-file={munge}/munged.seed"], munge / "munged.pid")
        self._start("slurmctld", [_tool("slurmctld"), "-c", "-f", str(self.conf)], self.dir / "slurmctld.pid")
        self._start("slurmd", [_tool("slurmd"), "-c", "-f", str(self.conf)], self.dir / "slurmd.pid")
        self.wait_idle()
        return self

    def _start(self, name: str, argv: list[str], pid_file: Path, timeout: float = 30.0) -> None:
        # The daemons fork into the background and write their pid file; their own output goes to the log.
        result = subprocess.run(argv, env=self.env(), capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{name} did not start (exit {result.returncode}): "
                               f"{(result.stderr or result.stdout).strip()[-2000:]}\n{self.logs()}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pid_file.exists() and pid_file.read_text().strip():
                self.pids[name] = int(pid_file.read_text().split()[0])
                return
            time.sleep(0.1)
        raise RuntimeError(f"{name} wrote no pid file {pid_file} in {timeout:g} s\n{self.logs()}")

    def run(self, *argv: str, check: bool = True, env: dict[str, str] | None = None,
            timeout: float = 30.0) -> subprocess.CompletedProcess:
        # From the cluster's directory: sbatch makes it the jobs' SLURM_SUBMIT_DIR (their default output place).
        result = subprocess.run(list(argv), env=self.env(env), capture_output=True, text=True, timeout=timeout,
                                cwd=self.dir)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: exit {result.returncode}: {result.stderr.strip()}")
        return result

    def wait_idle(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            result = self.run("sinfo", "--noheader", "-N", "-o", "%N %t", check=False)
            last = (result.stdout + result.stderr).strip()
            if re.search(rf"^{re.escape(self.node)} idle$", last, re.M):
                return
            time.sleep(0.5)
        raise RuntimeError(f"node {self.node} not idle after {timeout:g} s (sinfo: {last!r})\n{self.logs()}")

    def sbatch(self, *args: str, env: dict[str, str] | None = None) -> str:
        """Submit; returns the job id."""
        out = self.run("sbatch", "--parsable", *args, env=env).stdout.strip()
        return out.split(";")[0]

    def task_job_id(self, array_job: str, task: int) -> str | None:
        """The job id of one array task (each task is a job of its own), once Slurm has split it off."""
        for record in self.job_fields(array_job):
            if record.get("ArrayTaskId") == str(task):
                return record.get("JobId")
        return None

    def job_fields(self, job_id: str) -> list[dict[str, str]]:
        """``scontrol show job`` as dicts (one per array task), [] once Slurm forgot the job."""
        result = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        records = []
        for line in result.stdout.splitlines():
            records.append(dict(m.groups() for m in re.finditer(r"(\w+(?:\:\w+)?)=(\S*)", line)))
        return records

    def wait_done(self, job_id: str, timeout: float) -> list[dict[str, str]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            records = self.job_fields(job_id)
            if records and all(r.get("JobState") in FINAL_STATES for r in records):
                return records
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not finished after {timeout:g} s: "
                           f"{[(r.get('JobId'), r.get('JobState')) for r in self.job_fields(job_id)]}")

    def logs(self) -> str:
        parts = []
        for path in (self.dir / "slurmctld.log", self.dir / "slurmd.log", self.dir / "munge" / "munged.log"):
            if path.exists():
                parts.append(f"--- {path.name} (last lines)\n" + "\n".join(path.read_text().splitlines()[-15:]))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel every job, stop slurmd, slurmctld and munged (in that order, by pid), end any job process
        left (slurmstepd outlives slurmd by design), and remove the directory."""
        if "slurmctld" in self.pids:
            self.run("scancel", "--full", "--user", "root", check=False)
            deadline = time.monotonic() + 45
            while time.monotonic() < deadline and (self._step_daemons() or self._queue_not_empty()):
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.pids.pop(name, None)
            if pid is not None:
                _stop_pid(pid)
        for pid in self._step_daemons():  # only if a job did not end in time: its steps and their processes
            for proc in _tree(pid):
                _stop_pid(proc, timeout=5)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _queue_not_empty(self) -> bool:
        result = self.run("squeue", "--noheader", check=False)
        return result.returncode == 0 and bool(result.stdout.strip())

    def job_steps_running(self, job_id: str) -> bool:
        """Whether a slurmstepd of the job (any step, e.g. ``[8.batch]``) is still there."""
        for pid in self._step_daemons():
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].startswith(
                        f"slurmstepd: [{job_id}.".encode()):
                    return True
            except OSError:
                continue
        return False

    def _step_daemons(self) -> list[int]:
        """Pids of this cluster's slurmstepd processes (found by the SLURM_CONF in their environment)."""
        marker = f"SLURM_CONF={self.conf}".encode()
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if Path(f"/proc/{entry}/comm").read_text().strip() != "slurmstepd":
                    continue
                if marker in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    found.append(int(entry))
            except OSError:
                continue
        return found

    def __enter__(self) -> SlurmCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE"}


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants, deepest last (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    order, todo = [], [pid]
    while todo:
        current = todo.pop()
        order.append(current)
        todo.extend(children.get(current, []))
    return order


def _stop_pid(pid: int, timeout: float = 20.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
