"""Session set-up and the shared fixtures.

The sample documents every test reads are built here, never read from outside the repo. Fixtures:
``deployments`` (supervised stand-in deployments), ``standins`` (start stand-in vLLM servers, all stopped after
the test), ``standin`` (one stand-in vLLM server), ``s3_server``
(moto in server mode), ``workspace`` (each test twice: a local workspace path and an ``s3://`` one), and the autouse clean-up of pypdfium2 documents left by in-process render jobs.
Helpers are imported inside the fixtures: ``tests.pipeline_helpers`` builds the sample documents when it is
imported, which must wait for :func:`pytest_configure`. Tests that run pipelines use
``tests.pipeline_helpers.running_pipeline``."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests import sample_docs
from tests.deployment_helpers import Deployment

if TYPE_CHECKING:
    from tests.pipeline_helpers import StandIn, Standins
    from tests.s3_helpers import S3Server

#: ``pytester`` (a pytest inside pytest): tests/test_tiers.py runs its rule for real.
pytest_plugins = ["pytester"]

_root: Path | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _root
    _root = Path(tempfile.mkdtemp(prefix="olmocr-sample-docs-"))
    sample_docs.use(_root)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist, the longest work first (grouped, then ``slow``), so that it does not start last and
    keep one worker busy while the others are done. Every worker sorts alike (xdist requires the same
    collection); the sort is stable, so a group's tests keep their order. A serial run keeps the file order."""
    if hasattr(config, "workerinput"):  # an xdist worker
        items.sort(key=lambda item: (item.get_closest_marker("xdist_group") is None,
                                     item.get_closest_marker("slow") is None))


def pytest_unconfigure(config: pytest.Config) -> None:
    if _root is not None:
        shutil.rmtree(_root, ignore_errors=True)


@pytest.fixture
def deployments():
    """Start supervised stand-in deployments (``deployments(**Deployment kwargs)``); all cleaned up after."""
    created: list[Deployment] = []

    def make(**kwargs) -> Deployment:
        dep = Deployment(**kwargs)
        created.append(dep)
        return dep.start()

    yield make
    for dep in created:
        dep.cleanup()


@pytest.fixture
def standins(tmp_path: Path) -> Iterator[Standins]:
    """Start stand-in vLLM servers the way vLLM is launched: ``standins(OLMOCR_STANDIN_LATENCY=2)`` returns a
    ready :class:`tests.pipeline_helpers.StandIn` (``.url``, ``.port``, ``.control()``, ``.kill()``,
    ``.restart()``, ``.stop()``). Upper-case keywords are the server's environment; the knobs are
    ``served_model_name``, ``extra_args``, ``port``, ``host``, ``ready`` and ``env`` (a mapping). All are
    stopped (process group) after the test, and each must leave its own ``TMPDIR`` empty. The API: :class:`tests.pipeline_helpers.Standins`."""
    from tests.pipeline_helpers import Standins

    with Standins(tmp_path) as start:
        yield start


@pytest.fixture
def standin(standins: Standins) -> StandIn:
    """A stand-in vLLM server on 127.0.0.1 (default settings; ``standin.control(...)`` changes them)."""
    return standins()


@pytest.fixture(params=["local", "s3"])
def workspace(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A workspace that does not exist yet: a local directory, then a prefix in a fresh moto bucket."""
    if request.param == "local":
        return str(tmp_path / "ws")
    server: S3Server = request.getfixturevalue("s3_server")
    return server.url("ws")


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """moto in server mode on 127.0.0.1 with a fresh bucket; sets ``AWS_ENDPOINT_URL`` and dummy credentials
    with ``monkeypatch`` (child processes started by the test inherit them). See tests/s3_helpers.py."""
    import uuid

    from tests.s3_helpers import S3Server, start_s3_server

    endpoint, stop = start_s3_server()
    try:
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        server = S3Server(endpoint=endpoint, bucket=f"test-{uuid.uuid4().hex[:12]}", _stop=stop)
        server.client().create_bucket(Bucket=server.bucket)
        yield server
    finally:
        stop()


@pytest.fixture(autouse=True)
def _close_cached_render_docs() -> Iterator[None]:
    """Tests that call the render jobs in-process leave pypdfium2 documents cached: close them."""
    yield
    render = sys.modules.get("olmocr.pipeline.pages.render")
    if render is not None:
        while render._docs:
            render._docs.popitem()[1].close()


@pytest.fixture
def manager_run():
    """Start ``python -m olmocr.vllm_server_manager`` runs (``manager_run(*args, control=...)``); all killed after."""
    from tests.manager_helpers import ManagerRun

    runs: list[ManagerRun] = []

    def make(*args: str, **kwargs) -> ManagerRun:
        run = ManagerRun(*args, **kwargs)
        runs.append(run)
        return run

    yield make
    for run in runs:
        run.kill()
