"""The Grafana dashboard's panel queries (deploy/grafana/olmocr-serve.json), as Grafana would send them."""

from __future__ import annotations

import json

from tests.standin_helpers import REPO_ROOT

GRAFANA = REPO_ROOT / "deploy" / "grafana"
DASHBOARD = json.loads((GRAFANA / "olmocr-serve.json").read_text())


def panels() -> list[dict]:
    return [p for p in DASHBOARD["panels"] if p["type"] != "row"]


def queries() -> list[tuple[str, str]]:
    """``(panel title, PromQL)`` of every target of every panel."""
    return [(p["title"], t["expr"]) for p in panels() for t in p["targets"]]


def substitute(expr: str, instance: str, server: str) -> str:
    """What Grafana sends for one selected value of each variable (rate interval: 5 scrapes at 1 s; the
    dashboard's time range, ``$__range``: its default hour)."""
    return (expr.replace("$__rate_interval", "5s").replace("$__range", "1h").replace("$instance", instance)
            .replace("$server", server))
