"""Reading Prometheus text with prometheus_client's own parser, for the metrics tests."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def parse_metrics(text: str) -> dict[str, float]:
    """``{'name{label=value,...}': value}`` for every sample (labels sorted by name)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


def exported_names() -> set[str]:
    """Sample names the status service and the pipeline export, with every optional series present (one
    server, a workspace with page totals and a rate): what alert rules and dashboard panels may use."""
    from prometheus_client import generate_latest

    from olmocr.pipeline.metrics import PipelineMetrics
    from olmocr.pipeline.progress import Progress
    from olmocr.pipeline.servers.balance import Server
    from olmocr.pipeline.servers.client import ServerClient
    from olmocr.pipeline.workspace.totals import PageTotals
    from olmocr.server.status_service import ServiceSettings, Snapshot, StatusService

    stats = {"restarts": 1, "starts": 2, "kills_by_reason": {"completion_timeout": 1}, "last_healthy_time": 1.0,
             "health": {"time": 1.0, "latency_ms": 5.0, "consecutive_failures": 0}}
    snapshot = Snapshot({"healthy": True, "state": "RUNNING", "health_phase": "healthy", "uptime_seconds": 1},
                        info={"statename": "RUNNING"}, stats=stats, settings={"model": "m"})
    service = StatusService(ServiceSettings(), read=lambda: snapshot)
    service.update(snapshot)
    progress = Progress()
    progress.workspace = PageTotals(total=10, done=5, items=2, items_done=1, rate=1.0)
    server = Server(ServerClient("http://s:1"), state="up")
    pipeline = PipelineMetrics(progress, lambda: [server])
    pipeline.queue_counts = {"pending": 1, "leased": 0, "done": 0}
    names: set[str] = set()
    for registry in (service.registry, pipeline.registry):
        names |= {key.split("{")[0] for key in parse_metrics(generate_latest(registry).decode())}
    return names
