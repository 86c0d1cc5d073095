"""One pipeline across several vLLM servers (stand-ins on 127.0.0.1): server list, balancing, ejection and
re-admission, hung and misconfigured servers, all servers down, TLS with a private CA and per-server keys,
request priorities end to end, and the server's scheduling-policy option."""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import threading
import time
from pathlib import Path

import pytest
import requests

from olmocr.pipeline.errors import FleetConfigError
from olmocr.pipeline.pages.page import request_template
from olmocr.pipeline.servers.balance import (
    RATE_MIN_SAMPLES,
    STEAL_BATCH,
    WARMUP_CAP,
    RateMeter,
    Server,
    choose,
    plan_steals,
)
from olmocr.pipeline.servers.checks import LOG_CONTEXT_TOO_SMALL, LOG_NO_OLMOCR_MODEL, MODEL_NAME
from olmocr.pipeline.servers.client import ServerClient
from olmocr.pipeline.servers.fleet import (
    LOG_ALL_DOWN,
    LOG_EJECTED,
    LOG_IN_ROTATION,
    LOG_LEFT_OUT,
    LOG_MOVED,
    LOG_NOT_REACHABLE,
    LOG_READMITTED,
)
from olmocr.pipeline.servers.serverlist import parse_url_list, server_specs
from olmocr.server.command import build_vllm_command
from olmocr.server.errors import SettingsError
from olmocr.server.server_args import add_server_arguments, settings_from_args
from olmocr.server.settings import ServerSettings
from tests.metrics_helpers import parse_metrics
from tests.pipeline_helpers import (
    StandIn,
    Standins,
    assert_every_page_once,
    log_line,
    logged,
    run_pipeline,
    running_pipeline,
    wait_for,
)
from tests.sample_docs import write_text_pdf
from tests.standin_helpers import VLLM_FLAGS, chat_payload, free_port

pytestmark = pytest.mark.timeout(180)

PAGES_PER_DOC = 5


def make_pdfs(directory: Path, docs: int, pages: int = PAGES_PER_DOC) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    return [write_text_pdf(directory / f"doc{i:02d}.pdf", pages) for i in range(docs)]


@pytest.fixture(scope="module")
def pdfs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_pdfs(tmp_path_factory.mktemp("pdfs"), 24)  # 120 pages


def info(url: str, **kwargs: object) -> dict:
    r = requests.get(f"{url}/admin/info", timeout=5, **kwargs)  # type: ignore[arg-type]
    r.raise_for_status()
    return r.json()


def standin(standins: Standins, latency: float, concurrency: int | None = None) -> StandIn:
    """A stand-in answering each page after ``latency`` s, ``concurrency`` at once (default: no limit)."""
    if concurrency:
        return standins(OLMOCR_STANDIN_LATENCY=latency, OLMOCR_STANDIN_CONCURRENCY=concurrency)
    return standins(OLMOCR_STANDIN_LATENCY=latency)


# --------------------------------------------------------------------------------------------- units


def test_server_list_repeated_comma_separated_with_weights() -> None:
    assert parse_url_list(["http://a:1/v1/,http://b:2#weight=2", " https://c:3 ", ""]) == [
        ("http://a:1", None), ("http://b:2", 2.0), ("https://c:3", None)]
    assert parse_url_list(["127.0.0.1:30024"]) == [("http://127.0.0.1:30024", None)]
    with pytest.raises(FleetConfigError, match="listed twice"):
        parse_url_list(["http://a:1", "http://a:1/v1"])
    with pytest.raises(FleetConfigError, match="weight=N"):
        parse_url_list(["http://a:1#weight=0"])
    with pytest.raises(FleetConfigError, match="not an http"):
        parse_url_list(["ftp://a:1"])


def test_cli_rejects_a_bad_server_list_before_doing_anything(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from olmocr.pipeline.cli import main

    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "ws"), "--vllm-url", "http://127.0.0.1:1,http://127.0.0.1:1/v1", "--pdfs", "x.pdf"])
    assert exc.value.code == 2
    assert "listed twice" in capsys.readouterr().err
    # The list may come from the environment instead.
    monkeypatch.setenv("OLMOCR_VLLM_URL", "http://127.0.0.1:1,http://127.0.0.1:1")
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "ws"), "--pdfs", "x.pdf"])
    assert exc.value.code == 2
    assert "listed twice" in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()


def test_key_file_per_server_and_default_and_never_echoed(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# fleet keys\nhttps://gpu1:30024/v1 key-one\n\ndefault-key\n")
    urls = parse_url_list(["https://gpu1:30024,https://gpu2:30024"])
    specs = server_specs(urls, "env-key", str(keys))
    assert [s.api_key for s in specs] == ["key-one", "default-key"]
    assert "key-one" not in repr(specs) and "default-key" not in repr(specs)
    assert [s.api_key for s in server_specs(urls, "env-key")] == ["env-key", "env-key"]
    keys.write_text("https://gpu1:30024 key-one extra-secret\n")
    with pytest.raises(FleetConfigError) as exc:
        server_specs(urls, None, str(keys))
    assert "line 1" in str(exc.value) and "extra-secret" not in str(exc.value)
    keys.write_text("https://gpu9:30024 key-nine\n")
    with pytest.raises(FleetConfigError, match="not in --vllm-url"):
        server_specs(urls, None, str(keys))
    with pytest.raises(FleetConfigError, match="cannot read"):
        server_specs(urls, None, str(tmp_path / "missing"))


def _server(url: str, weight: float | None = None) -> Server:
    s = Server(ServerClient(url), weight=weight)
    s.state = "up"
    return s


def _dispatch(servers: list[Server], n: int) -> list[int]:
    for _ in range(n):
        chosen = choose(servers)
        assert chosen is not None
        chosen.in_flight += 1
    return [s.in_flight for s in servers]


def test_balancer_gives_outstanding_requests_in_proportion_to_capacity() -> None:
    # Fixed weights replace learning.
    assert _dispatch([_server("http://a:1", 2), _server("http://b:1", 1)], 300) == [200, 100]
    # Learned: answers per busy second; 8/s and 2/s measured over 10 s.
    fast, slow, new = _server("http://a:1"), _server("http://b:1"), _server("http://c:1")
    t0 = time.monotonic() - 10
    for server, rate in ((fast, 8), (slow, 2)):
        server.meter.set_busy(True, t0)
        for i in range(10 * rate):
            server.meter.answered(t0 + (i + 1) / rate, 1.0)
    assert fast.meter.rate() == pytest.approx(8, rel=0.15)
    assert slow.meter.rate() == pytest.approx(2, rel=0.15)
    counts = _dispatch([fast, slow], 500)
    assert counts[0] / counts[1] == pytest.approx(4, rel=0.15)
    # A server not yet measured is capped while it warms up, then treated like the median server.
    counts = _dispatch([fast, slow, new], 200)
    assert counts[2] == WARMUP_CAP and new.meter.answers < RATE_MIN_SAMPLES
    # Servers out of rotation get nothing.
    slow.state, fast.state = "down", "excluded"
    assert choose([fast, slow]) is None


def _learned(server: Server, rate: float) -> Server:
    t0 = time.monotonic() - 10
    server.meter.set_busy(True, t0)
    for i in range(int(10 * rate)):
        server.meter.answered(t0 + (i + 1) / rate, 1.0)
    return server


def _sent(server: Server, n: int) -> None:
    import asyncio

    for _ in range(n):
        server.requests[len(server.requests)] = asyncio.Event()
    server.in_flight += n


def test_work_stealing_moves_queued_requests_to_a_server_back_in_rotation() -> None:
    busy, other, back = (_learned(_server(f"http://{h}:1"), 4) for h in "abc")
    _sent(busy, 80)  # 20 s behind
    _sent(other, 8)  # 2 s behind
    back.meter.reset()  # just re-admitted: capacity not measured again yet
    moves = plan_steals([busy, other, back])
    # Only from the server furthest behind, its newest requests, a batch at a time.
    assert set(moves) == {busy} and 0 < len(moves) <= STEAL_BATCH
    newest = list(busy.requests.values())[-len(moves):]
    for server in moves:
        server.abandon_newest()
    assert all(e.is_set() for e in newest) and len(busy.requests) == 80 - len(moves)
    # Balanced servers never trade requests (hysteresis), and a lone server has nobody to give to.
    a, b = _learned(_server("http://a:1"), 4), _learned(_server("http://b:1"), 2)
    _sent(a, 40)
    _sent(b, 19)
    assert plan_steals([a, b]) == []
    assert plan_steals([a]) == []


def test_idle_time_does_not_dilute_a_learned_rate() -> None:
    meter = RateMeter()
    t0 = time.monotonic() - 40
    meter.set_busy(True, t0)
    for i in range(40):  # 4 answers/s for 10 s, then idle for 30 s
        meter.answered(t0 + (i + 1) * 0.25, 1.0)
    meter.set_busy(False, t0 + 10)
    assert meter.rate() == pytest.approx(4, rel=0.15)


def test_request_carries_priority_only_when_set() -> None:
    before, after = request_template(0.1, False, priority=-3)
    assert b'"priority": -3' in before + after
    before, after = request_template(0.1, False)
    assert b"priority" not in before + after


def test_server_scheduling_policy_option() -> None:
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    settings = settings_from_args(parser.parse_args(["--scheduling-policy", "priority"]), env={})
    argv = build_vllm_command(settings)
    assert argv[argv.index("--scheduling-policy") + 1] == "priority"
    from_env = ServerSettings.from_env({"OLMOCR_SCHEDULING_POLICY": "priority"})
    assert "--scheduling-policy" in build_vllm_command(from_env)
    assert "--scheduling-policy" not in build_vllm_command(ServerSettings())
    with pytest.raises(SettingsError, match="OLMOCR_SCHEDULING_POLICY"):
        ServerSettings.from_env({"OLMOCR_SCHEDULING_POLICY": "lifo"})


# --------------------------------------------------------------------------------------------- fleets


def _per_server(metrics_port: int, urls: list[str]) -> tuple[list[float], list[float]] | None:
    """(requests in flight, requests completed) per server from the pipeline's /metrics; None if unreadable."""
    try:
        text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2).text
    except requests.RequestException:
        return None
    got = parse_metrics(text)
    try:
        return ([got[f"olmocr_pipeline_requests_in_flight{{server={u}}}"] for u in urls],
                [got[f"olmocr_pipeline_requests_completed_total{{server={u}}}"] for u in urls])
    except KeyError:
        return None


@pytest.mark.slow
def test_pages_follow_capacity_and_each_server_is_visible(tmp_path: Path, pdfs: list[Path], standins: Standins) -> None:
    # 8 and 2 pages/s: together well under what the client renders even on a loaded 2-core machine, so the
    # servers, not the client, set the pace (a client-bound run spreads pages by who is idle, not capacity).
    fast = standin(standins, 1.0, 8)
    slow = standin(standins, 1.0, 2)
    ws, metrics_port = tmp_path / "ws", free_port()
    urls = [fast.url, slow.url]
    # At most 14 requests out (the servers work on 10 at once): each page is sent when one comes back, so
    # nearly every page is a choice of server made after the warm-up, on learned capacities. (Without the
    # cap, a client that renders fast sends most pages in the first seconds, before the slow server has
    # answered five; work stealing, not the choice, then spreads them, and least-outstanding can pass.)
    # Requests out to each server, sampled from the pipeline's per-server in-flight gauge while both have
    # measured capacities. Capacity-relative balancing, min (in_flight + 1) / capacity, keeps them ~4:1;
    # least-outstanding would keep them ~1:1 (and still send the fast one more pages, as it frees up first,
    # so the served counts alone cannot tell the two apart).
    in_flight = [0.0, 0.0]
    with running_pipeline(ws, ",".join(urls), pdfs, "--pages_per_group", "20", "--metrics_port",
                          str(metrics_port), "--max_concurrent_requests", "14", log=tmp_path / "run.log",
                          stop=[fast, slow]) as run:
        while run.poll() is None:
            sample = _per_server(metrics_port, urls)
            if sample is not None and min(sample[1]) >= 2 * RATE_MIN_SAMPLES and sum(sample[0]) >= 5:
                in_flight = [total + now for total, now in zip(in_flight, sample[0], strict=True)]
            time.sleep(0.2)
        rc, log = run.wait(10), run.output()
        served = [info(s.url)["image_requests_served"] for s in (fast, slow)]
    assert rc == 0, log
    assert_every_page_once(ws, pdfs)
    assert sum(served) == len(pdfs) * PAGES_PER_DOC
    assert served[0] >= 2 * served[1], served  # capacity 4:1
    assert sum(in_flight) >= 50, in_flight  # enough samples to judge
    # ~4:1 (3.7 measured); least-outstanding ~1:1 (0.9 to 1.0), round-robin fails sooner.
    assert in_flight[0] >= 2 * in_flight[1], in_flight
    # The choice did the balancing, not work stealing (0 moved; least-outstanding choices made it move 39-47).
    moved = int(logged(log, LOG_MOVED)[0].group(1))
    assert moved <= len(pdfs) * PAGES_PER_DOC // 10, moved
    assert logged(log, LOG_IN_ROTATION, 2, 2)
    progress = [line for line in log.splitlines() if "pages/s" in line and "server 2/2 up" in line]
    assert progress and fast.url not in progress[-1]  # the progress line stays short; each server in the summary
    assert f"server {fast.url}: up, {served[0]} pages" in log and f"server {slow.url}: up, {served[1]} pages" in log
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "olmocr.pipeline", str(ws), "--stats"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert f"{fast.url}: {served[0]} answers" in out and f"{slow.url}: {served[1]} answers" in out


@pytest.mark.slow
def test_misconfigured_servers_are_left_out_with_a_reason(tmp_path: Path, pdfs: list[Path], standins: Standins) -> None:
    good = standin(standins, 0.05)
    wrong = standins(served_model_name="some-other-model")
    locked = standins(VLLM_API_KEY="k-locked")
    # A context too small for a page at the default 1288 px: its requests would all be refused (HTTP 400).
    small = standins(extra_args=[*VLLM_FLAGS, "--max-model-len", "2048"])
    absent = f"http://127.0.0.1:{free_port()}"
    docs = pdfs[:2]
    rc, log = run_pipeline(tmp_path / "ws", f"{good.url},{wrong.url},{small.url},{absent}", docs,
                           log=tmp_path / "run.log")
    small_completions = requests.get(f"{small.url}/admin/info", timeout=10).json()["completions_seen"]
    rc2, log2 = run_pipeline(tmp_path / "ws2", f"{wrong.url},{locked.url}", docs, timeout=60,
                             log=tmp_path / "run2.log")
    assert rc == 0, log
    assert_every_page_once(tmp_path / "ws", docs)
    left_out = {m.group(1): m.group(2) for m in logged(log, LOG_LEFT_OUT)}  # url: reason
    assert set(left_out) == {small.url, wrong.url}, left_out
    assert log_line(LOG_CONTEXT_TOO_SMALL, 2048).search(left_out[small.url]), left_out[small.url]
    assert log_line(LOG_NO_OLMOCR_MODEL, MODEL_NAME, "some-other-model").search(left_out[wrong.url])
    assert small_completions == 0  # the run never sent it a page it would have had to refuse
    assert logged(log, LOG_NOT_REACHABLE, absent)
    # None usable: fail fast, before claiming any work, saying why for each.
    assert rc2 == 1
    assert "none of the 2 vLLM servers is usable" in log2
    assert logged(log2, LOG_NO_OLMOCR_MODEL, MODEL_NAME) and "rejected the API key" in log2
    locks = tmp_path / "ws2" / "worker_locks"
    assert not locks.exists() or not any(locks.iterdir())


@pytest.mark.slow
def test_killed_server_is_ejected_its_pages_resent_and_it_is_readmitted(tmp_path: Path, pdfs: list[Path],
                                                                        standins: Standins) -> None:
    a = standin(standins, 0.3, 2)
    b = standin(standins, 0.3, 2)
    ws, log = tmp_path / "ws", tmp_path / "run.log"
    # One attempt per page: a page resent because its server died must not use it up.
    metrics_port = free_port()

    def healthy() -> dict[str, float]:
        text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        got = parse_metrics(text)
        return {s.url: got[f"olmocr_pipeline_server_healthy{{server={s.url}}}"] for s in (a, b)}

    with running_pipeline(ws, f"{a.url},{b.url}", pdfs, "--pages_per_group", "10", "--max_page_retries", "1",
                          "--metrics_port", str(metrics_port), log=log, stop=[a, b]) as run:
        wait_for(lambda: info(b.url)["image_requests_served"] >= 5, 60, "b to serve pages")
        b.kill()
        run.wait_log(log_line(LOG_EJECTED, b.url), 30, "b ejected")
        assert healthy() == {a.url: 1.0, b.url: 0.0}  # one series per server in the metrics
        b.restart()
        wait_for(lambda: logged(run.output(), LOG_READMITTED, b.url) or run.poll() is not None, 60, "b re-admitted")
        rc = run.wait(120)
        after_restart = info(b.url)["image_requests_served"]
    text = log.read_text()
    assert rc == 0, text
    assert_every_page_once(ws, pdfs)
    assert logged(text, LOG_EJECTED, b.url)
    assert logged(text, LOG_READMITTED, b.url)
    assert after_restart > 0, "the re-admitted server got no pages"


@pytest.mark.slow
def test_queued_requests_move_to_a_server_that_joins_mid_run(tmp_path: Path, pdfs: list[Path],
                                                             standins: Standins) -> None:
    """Work stealing in a real run: one server (2 pages/s) holds the whole run's queue when a second one
    joins; requests still waiting on the first move to the newcomer (resent there, no attempt used up)
    instead of only new pages going to it, and every page is still written once."""
    busy = standin(standins, 1.0, 2)
    late = standin(standins, 1.0, 2)
    late.kill()  # not up yet when the run starts: it joins once it answers
    docs = pdfs[:10]  # 50 pages: ~25 s on the busy server alone
    ws = tmp_path / "ws"
    with running_pipeline(ws, f"{busy.url},{late.url}", docs, "--pages_per_group", "10", "--max_page_retries",
                          "1", log=tmp_path / "run.log", stop=[busy, late]) as run:
        run.wait_log(log_line(LOG_NOT_REACHABLE, late.url), 60)
        late.restart()  # soon, while its probes are still frequent: the busy one has its queue by then
        run.wait_log(log_line(LOG_READMITTED, late.url), 60)
        rc = run.wait(120)
        log = run.output()
        served = [info(s.url)["image_requests_served"] for s in (busy, late)]
    assert rc == 0, log
    assert_every_page_once(ws, docs)
    moved = [int(m.group(1)) for m in logged(log, LOG_MOVED)]
    assert moved and moved[-1] > 0, log[-3000:]
    assert served[1] > 0, served


@pytest.mark.slow
def test_hung_server_is_taken_out_and_the_others_carry_on(tmp_path: Path, pdfs: list[Path], standins: Standins) -> None:
    ok = standin(standins, 0.05)
    hung = standins(OLMOCR_STANDIN_HANG="true")
    docs = pdfs[:4]
    # /health and /v1/models answer while completions hang: only the no-progress rule reveals it.
    rc, log = run_pipeline(tmp_path / "ws", f"{hung.url},{ok.url}", docs, "--request_timeout", "2",
                           "--max_page_retries", "1", log=tmp_path / "run.log")
    assert rc == 0, log
    assert_every_page_once(tmp_path / "ws", docs)
    assert logged(log, LOG_EJECTED, hung.url, "no request finished for 2s (hung?)")


@pytest.mark.slow
def test_all_servers_down_the_run_waits_says_so_and_finishes(tmp_path: Path, pdfs: list[Path],
                                                             standins: Standins) -> None:
    a = standin(standins, 0.3, 2)
    b = standin(standins, 0.3, 2)
    docs = pdfs[:12]
    ws, log = tmp_path / "ws", tmp_path / "run.log"
    with running_pipeline(ws, f"{a.url},{b.url}", docs, "--pages_per_group", "10", log=log, stop=[a, b]) as run:
        wait_for(lambda: info(a.url)["image_requests_served"] >= 3, 60, "pages served")
        a.kill()
        b.kill()
        run.wait_log(log_line(LOG_ALL_DOWN), 30, "the all-down message")
        time.sleep(1)
        assert run.poll() is None, run.output()
        a.restart()
        rc = run.wait(120)
    assert rc == 0, log.read_text()
    assert_every_page_once(ws, docs)


# --------------------------------------------------------------------------------------------- TLS + keys


def _make_ca_and_cert(directory: Path) -> tuple[Path, Path, Path]:
    """A private CA and a certificate for 127.0.0.1 signed by it (cryptography); returns (ca, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "olmocr test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    paths[2].chmod(0o600)
    return paths


def test_https_servers_with_a_private_ca_and_a_key_each(tmp_path: Path, pdfs: list[Path], standins: Standins) -> None:
    ca, cert, key = _make_ca_and_cert(tmp_path)
    keys = {"first": "k-first-0123456789", "second": "k-second-9876543210"}
    # Ready once /health answers over TLS with the private CA (the fixture's own check is plain HTTP).
    tls = (*VLLM_FLAGS, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key))
    servers = [standins(VLLM_API_KEY=secret, OLMOCR_STANDIN_LATENCY=0.05, extra_args=tls, ready=False)
               for secret in keys.values()]
    urls = [f"https://127.0.0.1:{server.port}" for server in servers]
    for url in urls:
        wait_for(lambda u=url: _answers(u, str(ca)), 30, f"{url} up")
    key_file = tmp_path / "keys"
    key_file.write_text("".join(f"{u} {k}\n" for u, k in zip(urls, keys.values(), strict=True)))
    key_file.chmod(0o600)
    docs = pdfs[:4]
    rc, log = run_pipeline(tmp_path / "ws", ",".join(urls), docs, "--ca_bundle", str(ca),
                           "--api_key_file", str(key_file), log=tmp_path / "run.log")
    served = [info(u, verify=str(ca), headers={"Authorization": f"Bearer {k}"})["image_requests_served"]
              for u, k in zip(urls, keys.values(), strict=True)]
    # Without the private CA the certificate is not trusted: a clear reason, before claiming work.
    rc2, log2 = run_pipeline(tmp_path / "ws2", ",".join(urls), docs, "--api_key_file", str(key_file),
                             timeout=60, log=tmp_path / "run2.log")
    assert rc == 0, log
    assert_every_page_once(tmp_path / "ws", docs)
    assert all(n > 0 for n in served), served
    assert rc2 == 1 and "certificate" in log2 and "--ca_bundle" in log2
    for secret in keys.values():
        assert secret not in log and secret not in log2


def _answers(url: str, ca: str) -> bool:
    try:
        return requests.get(f"{url}/health", timeout=2, verify=ca).status_code == 200
    except requests.RequestException:
        return False


# --------------------------------------------------------------------------------------------- priorities


def test_standin_serves_waiting_requests_by_priority(tmp_path: Path, standins: Standins) -> None:
    s = standins(OLMOCR_STANDIN_LATENCY=0.4, OLMOCR_STANDIN_CONCURRENCY=1,
                 extra_args=(*VLLM_FLAGS, "--scheduling-policy", "priority"))
    from tests.standin_helpers import make_png

    finished: list[str] = []
    lock = threading.Lock()

    def send(name: str, priority: int) -> None:
        body = chat_payload(make_png(8, 8), max_tokens=100) | {"priority": priority}
        r = requests.post(f"{s.url}/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 200
        with lock:
            finished.append(name)

    threads = []
    for name, priority in (("first", 0), ("low1", 5), ("low2", 5), ("high", -5)):
        t = threading.Thread(target=send, args=(name, priority))
        t.start()
        threads.append(t)
        time.sleep(0.1)  # arrival order: first (runs), low1, low2 (wait), high (waits, jumps the queue)
    for t in threads:
        t.join(timeout=30)
    assert finished == ["first", "high", "low1", "low2"]


def test_priority_end_to_end_and_refused_without_priority_scheduling(tmp_path: Path, pdfs: list[Path],
                                                                     standins: Standins) -> None:
    prio = standins(OLMOCR_STANDIN_LATENCY=0.05, extra_args=(*VLLM_FLAGS, "--scheduling-policy", "priority"))
    fcfs = standin(standins, 0.05)
    docs = pdfs[:2]
    rc, log = run_pipeline(tmp_path / "ws", prio.url, docs, "--priority", "-2", log=tmp_path / "run.log")
    seen = info(prio.url)["priorities"]
    rc2, log2 = run_pipeline(tmp_path / "ws2", fcfs.url, docs, "--priority", "-2", timeout=60,
                             log=tmp_path / "run2.log")
    assert rc == 0, log
    assert_every_page_once(tmp_path / "ws", docs)
    assert set(seen) == {"-2"} and seen["-2"] >= len(docs) * PAGES_PER_DOC
    assert rc2 == 1
    assert "refused a request with priority -2" in log2 and "--scheduling-policy priority" in log2


def test_the_servers_key_file_variable_is_one_key_for_every_server(tmp_path: Path) -> None:
    """OLMOCR_API_KEY_FILE means to the pipeline what it means to the server: the file is the key. The
    multi-line KEY / URL KEY format has its own variable, OLMOCR_API_KEYS_FILE."""
    from olmocr.pipeline.cli import resolve_api_key
    from olmocr.pipeline.servers.serverlist import server_specs

    key = tmp_path / "key"
    key.write_text("s3cret key with spaces\n")
    keys = tmp_path / "keys"
    keys.write_text("http://127.0.0.1:1 k-one\nk-default\n")
    urls = [("http://127.0.0.1:1", None), ("http://127.0.0.1:2", None)]
    env = {"OLMOCR_API_KEY_FILE": str(key)}
    assert resolve_api_key(None, env) == "s3cret key with spaces"
    assert [s.api_key for s in server_specs(urls, resolve_api_key(None, env))] == ["s3cret key with spaces"] * 2
    assert [s.api_key for s in server_specs(urls, resolve_api_key(None, env), str(keys))] == ["k-one", "k-default"]
    assert resolve_api_key(None, {**env, "OLMOCR_API_KEY": "from-env"}) == "from-env"
    assert resolve_api_key("from-flag", env) == "from-flag"
    with pytest.raises(FleetConfigError, match="cannot read API key file"):
        resolve_api_key(None, {"OLMOCR_API_KEY_FILE": str(tmp_path / "missing")})


@pytest.mark.slow
def test_ejection_after_exactly_three_failures_and_readmission_after_two_good_probes(tmp_path: Path,
                                                                                     standins: Standins) -> None:
    """Pins EJECT_AFTER = 3 and READMIT_AFTER = 2 against real stand-ins: two failures in a row leave a
    server in rotation, the third ejects it; probes that alternate good/bad never re-admit it, two good
    ones in a row do."""
    import asyncio
    import json

    from olmocr.pipeline.servers.balance import ServerState
    from olmocr.pipeline.servers.fleet import EJECT_AFTER, READMIT_AFTER, Fleet
    from olmocr.pipeline.servers.serverlist import ServerSpec
    from tests.standin_helpers import make_png

    assert (EJECT_AFTER, READMIT_AFTER) == (3, 2)
    flaky, steady = standins(), standins()
    body = json.dumps(chat_payload(make_png(64, 64), max_tokens=50)).encode()

    async def make_body() -> list[bytes]:
        return [body]

    async def scenario() -> None:
        fleet = Fleet([ServerSpec(flaky.url, 1.0, None), ServerSpec(steady.url, 1.0, None)], request_timeout=30)
        await fleet.start(max_wait_s=30)
        a = next(s for s in fleet.servers if s.url == flaky.url)
        b = next(s for s in fleet.servers if s.url == steady.url)
        try:
            # Every completion on the flaky one fails; requests are sequential, and a server out of rotation
            # gets none: its error count when it leaves is the number of failures in a row that ejects it.
            flaky.control(error_rate=1.0, error_status=500)
            for _ in range(20):
                await fleet.chat(make_body, "page")  # every page is answered (by the steady one at last)
                if a.state != ServerState.UP:
                    break
            assert a.state == ServerState.DOWN
            assert a.errors == 3 and b.errors == 0  # the third failure in a row ejects, not the first or second
            # Probes (1-token completions) now alternate ok / 500: never two good in a row.
            flaky.control(error_rate=0.5)
            await asyncio.sleep(8)
            assert a.state == ServerState.DOWN
            flaky.control(error_rate=0.0)
            deadline = time.monotonic() + 30
            while a.state != ServerState.UP and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert a.state == ServerState.UP
        finally:
            await fleet.close()

    asyncio.run(scenario())
