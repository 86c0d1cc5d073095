"""deploy/kubernetes/components/olmocr-service (overlay overlays/service): olmocr-service's Deployment and
Service with its probes, and its workers as ``--follow`` pipelines. Checked as tests/test_kubernetes.py checks
the base: ``kubectl kustomize``, ``kubernetes-validate --strict`` on the oldest and newest Kubernetes targeted,
the commands against the programs' own argument parsers, and the probes against the service run the way the
pod runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml

from olmocr.pipeline.cli import build_parser as pipeline_parser
from olmocr.pipeline.servers.serverlist import parse_dns_names
from olmocr.service.cli import build_parser as service_parser
from tests.standin_helpers import REPO_ROOT, clean_env, free_port, stop_process_group
from tests.test_kubernetes import (
    CRD_KINDS,
    KUBE_DIR,
    KUBE_VERSIONS,
    container,
    container_env,
    expand,
    kustomize,
    one,
    tool,
)
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(300)

OVERLAY = KUBE_DIR / "overlays" / "service"


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    return kustomize(OVERLAY)


def pod(objects: list[dict], name: str) -> dict:
    return one(objects, "Deployment", name)["spec"]["template"]


def argv(objects: list[dict], c: dict) -> list[str]:
    env = container_env(objects, c)
    return [expand(a, env) for a in c["args"]]


@pytest.mark.slow
@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_the_service_overlay_passes_strict_validation(objects, version, tmp_path):
    path = tmp_path / "service.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    out = subprocess.run([tool("kubernetes-validate"), "--strict", "-k", version, str(path)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    checked = [o for o in objects if o["kind"] not in CRD_KINDS]
    assert out.stdout.count(" passed for resource ") == len(checked), out.stdout
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert {("Deployment", "olmocr-service"), ("Service", "olmocr-service"),
            ("Deployment", "olmocr-follow-workers"), ("Deployment", "olmocr-server")} <= names
    assert all(o["metadata"].get("namespace") == "olmocr" for o in objects)


def test_the_base_alone_has_no_service(objects):
    base = kustomize(KUBE_DIR)
    assert not [o for o in base if o["metadata"]["name"].startswith(("olmocr-service", "olmocr-follow"))]
    assert "OLMOCR_SCHEDULING_POLICY" not in one(base, "ConfigMap", "olmocr-server-config")["data"]


def test_the_service_command_probes_and_service_agree(objects):
    template = pod(objects, "olmocr-service")
    c = container(template["spec"], "service")
    assert c["command"][-3:] == ["python3", "-m", "olmocr.service"]
    args = service_parser().parse_args(argv(objects, c))
    assert args.workspace.startswith("s3://") and args.workers == 0
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == args.port
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    # Beyond loopback it needs its token: from the Secret, as a file.
    assert args.host == "0.0.0.0"
    token = container_env(objects, c)["OLMOCR_SERVICE_TOKEN_FILE"]
    mount = next(m for m in c["volumeMounts"] if token.startswith(m["mountPath"] + "/"))
    volume = next(v for v in template["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "olmocr-keys"
    assert token.removeprefix(mount["mountPath"] + "/") in {i["path"] for i in volume["secret"]["items"]}
    service = one(objects, "Service", "olmocr-service")["spec"]
    assert service["selector"].items() <= template["metadata"]["labels"].items()
    assert [p["targetPort"] for p in service["ports"]] == ["http"]


def test_the_workers_follow_the_same_workspace_and_reach_the_servers(objects):
    service_args = service_parser().parse_args(argv(objects, container(pod(objects, "olmocr-service")["spec"],
                                                                       "service")))
    template = pod(objects, "olmocr-follow-workers")
    c = container(template["spec"], "pipeline")
    assert c["command"][-3:] == ["python3", "-m", "olmocr.pipeline"]
    args, unknown = pipeline_parser().parse_known_args(argv(objects, c))
    assert unknown == [] and args.follow
    assert args.workspace == service_args.workspace
    assert args.workspace == one(objects, "Job")["spec"]["template"]["spec"]["containers"][0]["args"][0]
    server = one(objects, "Service", "olmocr-server")
    names = parse_dns_names(args.server)
    assert [(n.host, n.ports) for n in names] == [(server["metadata"]["name"], (30024,))]
    # The servers admit them (NetworkPolicy) and schedule by priority, which their --priority needs.
    policy = one(objects, "NetworkPolicy", "olmocr-server")["spec"]
    clients = [f["podSelector"]["matchLabels"] for r in policy["ingress"] for f in r["from"] if "podSelector" in f]
    assert any(sel.items() <= template["metadata"]["labels"].items() for sel in clients)
    assert args.priority is not None
    assert one(objects, "ConfigMap", "olmocr-server-config")["data"]["OLMOCR_SCHEDULING_POLICY"] == "priority"
    assert template["spec"]["terminationGracePeriodSeconds"] > args.stop_timeout


def test_the_probes_answer_without_the_token_on_the_service_run_as_the_pod_runs_it(objects, tmp_path: Path):
    c = container(pod(objects, "olmocr-service")["spec"], "service")
    words = argv(objects, c)
    port = free_port()
    # Its own workspace, and loopback (tests bind 127.0.0.1 only): the rest as in the manifest.
    words = [str(tmp_path / "ws"), *(w if not w.startswith("--port=") else f"--port={port}" for w in words[1:]
                                     if not w.startswith("--host="))]
    token = tmp_path / "service-token"
    token.write_text("s3cret\n")
    env = clean_env({"OLMOCR_SERVICE_TOKEN_FILE": str(token)})
    with open(tmp_path / "service.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "olmocr.service", *words], env=env, cwd=str(REPO_ROOT),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert proc.poll() is None, (tmp_path / "service.log").read_text()
            try:
                return requests.get(url + "/healthz", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_for(up, 60, "olmocr-service")
        for probe in ("livenessProbe", "readinessProbe"):  # the kubelet sends no token
            assert requests.get(url + c[probe]["httpGet"]["path"], timeout=10).status_code == 200, probe
        assert requests.get(url + "/v1/jobs", timeout=10).status_code == 401
        assert requests.get(url + "/v1/jobs", timeout=10, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    finally:
        stop_process_group(proc)
