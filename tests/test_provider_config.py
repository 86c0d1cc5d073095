"""Hosted providers (#31), the pure parts: a URL keeps its path, per-server options in the fragment, the
run's flags as defaults, pacing, the stand-in's provider bookkeeping."""

from __future__ import annotations

import argparse
import subprocess
import sys
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest

from olmocr.pipeline.errors import FleetConfigError
from olmocr.pipeline.servers.client import api_root, model_cards, normalize_base_url
from olmocr.pipeline.servers.discovery import server_urls
from olmocr.pipeline.servers.pacing import SAFETY, Pacer, make_pacer
from olmocr.pipeline.servers.serverlist import (
    Options,
    parse_dns_names,
    parse_servers,
    parse_url_list,
    parse_url_options,
    run_options,
    server_specs,
)
from olmocr.standin.control import Control
from olmocr.standin.provider import IN_FLIGHT_GRACE_S, Gate, api_path, retry_after_header
from tests.standin_helpers import REPO_ROOT, clean_env

MODEL = "allenai/olmOCR-2-7B-1025"


@pytest.mark.parametrize("given, base, root", [
    ("http://gpu:30024", "http://gpu:30024", "/v1"),  # no path: /v1 as today
    ("http://gpu:30024/", "http://gpu:30024", "/v1"),
    ("http://gpu:30024/v1", "http://gpu:30024", "/v1"),  # /v1 as today
    ("http://gpu:30024/v1/", "http://gpu:30024", "/v1"),
    ("gpu:30024", "http://gpu:30024", "/v1"),
    ("https://api.deepinfra.com/v1/openai", "https://api.deepinfra.com/v1/openai", "/v1/openai"),  # DeepInfra
    ("https://openrouter.ai/api/v1/", "https://openrouter.ai/api/v1", "/api/v1"),  # a path ending in v1
    ("https://host/v1/openai/", "https://host/v1/openai", "/v1/openai"),
])
def test_a_url_keeps_its_path(given, base, root):
    assert normalize_base_url(given) == base
    assert api_root(base) == root


def test_ranges_and_dns_names_keep_the_path():
    urls = parse_url_list(["http://box:30024-30025/v1/openai"])
    assert urls == [("http://box:30024/v1/openai", None), ("http://box:30025/v1/openai", None)]
    [name] = parse_dns_names(["dns+https://pool.svc:30024/v1/openai#model=m"])
    assert name.label == "dns+https://pool.svc:30024/v1/openai"
    assert server_urls(name, ["10.0.0.1", "fd00::1"]) == ["https://10.0.0.1:30024/v1/openai",
                                                          "https://[fd00::1]:30024/v1/openai"]
    assert name.options.model == "m"
    [plain] = parse_dns_names(["dns+http://pool.svc:30024"])
    assert plain.path == "" and server_urls(plain, ["10.0.0.2"]) == ["http://10.0.0.2:30024"]


def test_fragment_options():
    [(url, weight, options)] = parse_servers(
        [f"https://api.x/v1/openai#weight=2&model={MODEL}&price_in=0.09&price_out=0.19&rpm=600&tpm=1e6"])
    assert (url, weight) == ("https://api.x/v1/openai", 2.0)
    assert options == Options(MODEL, 0.09, 0.19, 600.0, 1e6)
    assert parse_url_options(["http://a:1"]) == {"http://a:1": Options()}


@pytest.mark.parametrize("value, message", [
    ("http://a:1#colour=red", "'colour' is not understood"),
    ("http://a:1#rpm=0", "'#rpm=N' needs a number N > 0 (requests per minute)"),
    ("http://a:1#price_in=cheap", "'#price_in=N' needs a number N > 0"),
    ("http://a:1#tpm=inf", "'#tpm=N' needs a number N > 0"),
    ("http://a:1#model=", "'#model=NAME' needs the name"),
    ("http://a:1#weight", "'weight' is not understood"),
])
def test_bad_fragments_are_one_line(value, message):
    with pytest.raises(FleetConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_servers([value])


def test_the_run_flags_are_defaults_and_a_fragment_wins(tmp_path: Path):
    args = argparse.Namespace(model=MODEL, price_in=0.1, price_out=0.2, rpm=None, tpm=5000.0)
    values = ["http://local:30024#model=olmocr&price_in=0.5", "https://api.x/v1/openai"]
    keys = tmp_path / "keys"
    keys.write_text("https://api.x/v1/openai sk-one\n")
    specs = server_specs(parse_url_list(values), None, str(keys), options=parse_url_options(values),
                         defaults=run_options(args, internal=False))
    assert [s.options for s in specs] == [Options("olmocr", 0.5, 0.2, None, 5000.0), Options(MODEL, 0.1, 0.2, None, 5000.0)]
    assert [s.api_key for s in specs] == [None, "sk-one"]  # a key file line names a URL with its path
    assert "sk-one" not in repr(specs)
    # internal mode: --model is the model to serve, not a served name
    assert run_options(args, internal=True).model is None


def test_model_cards_keep_what_says_which_weights():
    body = ('{"data": [{"id": "olmocr", "root": "allenai/olmOCR-2-7B-1025-FP8", "max_model_len": 16384, '
            '"owned_by": "vllm", "permission": [], "created": 1}]}')
    assert model_cards(body) == {"olmocr": {"root": "allenai/olmOCR-2-7B-1025-FP8", "max_model_len": 16384,
                                            "owned_by": "vllm"}}
    assert model_cards('{"data": []}') == {}
    with pytest.raises(ValueError):
        model_cards("<html>")


def test_pacer_spacing_and_retry_after():
    assert make_pacer(None, None) is None
    pacer = Pacer(rpm=60)
    assert pacer.spacing() == pytest.approx(1.0 * SAFETY)
    turns = [pacer.take(100.0) for _ in range(3)]  # three requests at once: spaced, not a burst
    assert turns == pytest.approx([100.0, 100.0 + SAFETY, 100.0 + 2 * SAFETY])
    assert pacer.ready_at() == pytest.approx(100.0 + 2 * SAFETY)  # one already waits: choose another server
    pacer.hold(200.0)  # a Retry-After
    assert pacer.take(150.0) == 200.0
    tokens = Pacer(tpm=6000)
    tokens.answered(3000)
    assert tokens.spacing() == pytest.approx(30.0 * SAFETY)  # 3,000 tokens a request at 6,000 a minute
    tokens.answered(0)  # no usage reported: the estimate stays
    assert tokens.tokens_per_request == 3000


def test_standin_provider_paths():
    assert api_path("/v1/openai/models", "/v1/openai") == "/v1/models"
    assert api_path("/v1/openai/chat/completions", "v1/openai/") == "/v1/chat/completions"
    assert api_path("/v1/models", "/v1/openai") is None
    assert api_path("/health", "/v1/openai") is None
    assert api_path("/health", None) == "/health"


def test_standin_retry_after_forms():
    now = 1_800_000_000.25
    assert retry_after_header(1.2, "seconds", now) == ("2", now + 2)
    value, until = retry_after_header(1.2, "date", now)
    assert parsedate_to_datetime(value).timestamp() == until == 1_800_000_002.0


def test_standin_quota_and_early_requests():
    control = Control(environ={"OLMOCR_STANDIN_RPM_QUOTA": "2", "OLMOCR_STANDIN_QUOTA_WINDOW_S": "10"})
    gate = Gate()
    assert gate.check(control, now=0.0) is None
    assert gate.check(control, now=1.0) is None
    assert gate.check(control, now=2.0) == (429, "8")  # the oldest leaves the window at 10
    assert gate.check(control, now=2.0 + IN_FLIGHT_GRACE_S / 2) == (429, "8")  # already on its way: not early
    assert gate.info()["early_requests"] == 0
    assert gate.check(control, now=5.0) is not None  # sent after the refusal, before its Retry-After
    assert gate.info() == {"throttled": 3, "early_requests": 1, "admitted": 2, "first_admitted": 0.0,
                           "last_admitted": 1.0}
    assert gate.check(control, now=10.5) is None


def test_bad_fragment_on_the_command_line_is_one_line(tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "olmocr.pipeline", str(tmp_path / "ws"), "--server",
                           "http://127.0.0.1:9#rpm=lots", "--pdfs", str(tmp_path / "none.pdf")],
                          capture_output=True, text=True, env=clean_env(), cwd=str(REPO_ROOT), timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "'#rpm=N' needs a number N > 0" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_budget_without_prices_is_one_line(tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "olmocr.pipeline", str(tmp_path / "ws"), "--server",
                           "http://127.0.0.1:9", "--max_cost", "5", "--pdfs", str(tmp_path / "none.pdf")],
                          capture_output=True, text=True, env=clean_env(), cwd=str(REPO_ROOT), timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "--max_cost needs prices" in proc.stderr and "Traceback" not in proc.stderr


def test_standin_token_quota():
    control = Control(environ={"OLMOCR_STANDIN_TPM_QUOTA": "5000", "OLMOCR_STANDIN_QUOTA_WINDOW_S": "10"})
    gate = Gate()
    assert gate.check(control, now=0.0) is None
    gate.spend(2600, now=0.5)
    assert gate.check(control, now=1.0) is None  # 2,600 of 5,000 spent
    gate.spend(2600, now=1.5)
    assert gate.check(control, now=2.0) == (429, "9")  # spent: until the first answer leaves the window at 10.5
    assert gate.check(control, now=10.6) is None
