"""``--metrics_port P``: the running pipeline's Prometheus metrics on ``http://127.0.0.1:P/metrics``.

Counters are read at scrape time from the objects the pipeline already keeps (``Progress``, each
server's counters in :class:`olmocr.pipeline.servers.balance.Server`), so the pipeline's own code only gains two latency hooks (render and
request) and a handful of counters. Per-server series carry a ``server`` label (the server's base
URL): one series per server when the pipeline talks to several. The work-queue counts are read from
the workspace every ``--progress_interval`` seconds in a worker thread (they list storage, which a
scrape must not wait for).

Served by aiohttp on the pipeline's own event loop (scrapes read the pipeline's state on the thread
that changes it). Bound beyond loopback (``--metrics_host``) it requires a bearer token from
``OLMOCR_METRICS_TOKEN`` or the file ``--metrics_token_file`` / ``OLMOCR_METRICS_TOKEN_FILE``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from olmocr.endpoints import bearer_middleware, metrics_response, start_app
from olmocr.pipeline.pages.output import FALLBACK_REASONS
from olmocr.pipeline.servers.balance import ServerState

logger = logging.getLogger(__name__)

TOKEN_VAR, TOKEN_FILE_VAR = "OLMOCR_METRICS_TOKEN", "OLMOCR_METRICS_TOKEN_FILE"
#: Render (pypdfium2 + PNG + base64, waiting for a render process included): milliseconds to seconds.
RENDER_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: One HTTP request to the server: a fast answer to a hung engine abandoned after --request_timeout.
REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class PipelineMetrics:
    """One run's registry: histograms fed by hooks, everything else read from the run at scrape time."""

    def __init__(self, progress: Any, servers: Callable[[], Iterable[Any]]) -> None:
        self.progress = progress
        self.servers = servers
        self.queue_counts: dict[str, int] | None = None
        self.fallback_by_reason: Mapping[str, int] = {}  # PageProcessor.fallback_by_reason (issue #30)
        self.start_time = time.time()
        self.registry = CollectorRegistry()
        self.render_seconds = Histogram(
            "olmocr_pipeline_render_seconds", "Time to get one page image (render, PNG, base64), waiting "
            "for a render process included", buckets=RENDER_BUCKETS, registry=self.registry)
        self.request_seconds = Histogram(
            "olmocr_pipeline_request_seconds", "Duration of one chat-completion request to a server, "
            "whatever its outcome", ["server"], buckets=REQUEST_BUCKETS, registry=self.registry)
        self.registry.register(_RunCollector(self))

    def observe_request(self, server: str) -> Callable[[float], None]:
        return self.request_seconds.labels(server=server).observe

    async def refresh_queue_forever(self, queue: Any, interval: float) -> None:
        while True:
            try:
                self.queue_counts = await asyncio.to_thread(queue.counts)
            except Exception as exc:  # noqa: BLE001 - storage hiccup: keep the last counts, try again
                logger.debug("metrics: cannot count work items: %s", exc)
            await asyncio.sleep(interval)


def run_metrics(metrics: PipelineMetrics) -> list[Metric]:
    """The counter and gauge families of one scrape (reads plain attributes: no I/O)."""
    p = metrics.progress

    def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
        return CounterMetricFamily(name, doc, value=value)

    out: list[Metric] = [
        counter("olmocr_pipeline_pages_done", "Pages finished, by the model or by the text-layer fallback",
                p.pages_done),
        counter("olmocr_pipeline_pages_fallback", "Pages that used the text layer because the model gave no "
                "usable answer (or the page could not be rendered)", p.fallback_pages),
        counter("olmocr_pipeline_pages_failed", "Pages of documents recorded as failed after their pages ran "
                "(more fallback pages than --max_page_error_rate); their text is not written",
                p.pages_failed),
        counter("olmocr_pipeline_page_attempts_failed", "Model attempts that gave no usable answer (each is "
                "retried, up to --max_page_retries)", p.attempts_failed),
        counter("olmocr_pipeline_pages_started", "Pages of the documents this run started", p.pages_total),
        counter("olmocr_pipeline_documents_done", "Documents written", p.docs_done),
        counter("olmocr_pipeline_documents_failed", "Documents recorded as failed", p.docs_failed),
        counter("olmocr_pipeline_work_items_done", "Work items completed by this run", p.items_done),
        counter("olmocr_pipeline_input_tokens", "Prompt tokens the server reported", p.input_tokens),
        counter("olmocr_pipeline_output_tokens", "Completion tokens the server reported", p.output_tokens),
    ]
    per_server = {
        "in_flight": GaugeMetricFamily("olmocr_pipeline_requests_in_flight", "Requests sent and not yet "
                                       "answered", labels=["server"]),
        "healthy": GaugeMetricFamily("olmocr_pipeline_server_healthy", "1 while the pipeline sees the server "
                                     "as up (answering requests)", labels=["server"]),
        "ok": CounterMetricFamily("olmocr_pipeline_requests_completed", "Requests answered with 200",
                                  labels=["server"]),
        "errors": CounterMetricFamily("olmocr_pipeline_request_errors", "Failed requests by kind: timeout "
                                      "and transient (connection error, 429, 5xx) are resent; rejected "
                                      "(other 4xx, bad answer) counts as a failed page attempt",
                                      labels=["server", "kind"]),
        "retries": CounterMetricFamily("olmocr_pipeline_request_retries", "Requests resent after a timeout "
                                       "or a transient error", labels=["server"]),
        "outages": CounterMetricFamily("olmocr_pipeline_server_outages", "Times the server was taken out of "
                                       "rotation (refusals, 5xx or a hang); its requests went to the others or "
                                       "waited until it was healthy again", labels=["server"]),
        # providers (#31): usage and cost by server, and the rate limits met
        "tokens": CounterMetricFamily("olmocr_pipeline_server_tokens", "Tokens the server's answers reported, "
                                      "by kind: input (prompt) and output (completion)", labels=["server", "kind"]),
        "cost": CounterMetricFamily("olmocr_pipeline_server_cost_dollars", "Dollars spent on the server's answers "
                                    "(tokens times its prices per million; 0 without prices)", labels=["server"]),
        "throttled": CounterMetricFamily("olmocr_pipeline_server_rate_limited", "Answers 429/503 with Retry-After: "
                                         "the server got no request until it had passed", labels=["server"]),
    }
    for srv in metrics.servers():  # olmocr.pipeline.servers.balance.Server: the fleet's per-server counters
        server = srv.url
        per_server["in_flight"].add_metric([server], srv.in_flight)
        per_server["healthy"].add_metric([server], float(srv.state == ServerState.UP))
        per_server["ok"].add_metric([server], srv.pages)
        per_server["errors"].add_metric([server, "timeout"], srv.timeouts)
        per_server["errors"].add_metric([server, "transient"], max(0, srv.errors - srv.timeouts))
        per_server["errors"].add_metric([server, "rejected"], srv.rejected)
        per_server["retries"].add_metric([server], srv.errors)
        per_server["outages"].add_metric([server], srv.ejections)
        # read with defaults: a stand-in object without usage counters (a test's) reports zero
        per_server["tokens"].add_metric([server, "input"], getattr(srv, "input_tokens", 0))
        per_server["tokens"].add_metric([server, "output"], getattr(srv, "output_tokens", 0))
        per_server["cost"].add_metric([server], getattr(srv, "cost", 0.0))
        per_server["throttled"].add_metric([server], getattr(srv, "throttled", 0))
    out += per_server.values()
    counts = metrics.queue_counts
    if counts is not None:
        items = GaugeMetricFamily("olmocr_pipeline_work_items", "Work items in the workspace queue by state "
                                  "(all workers), read every --progress_interval seconds", labels=["state"])
        for state in ("pending", "leased", "done"):
            items.add_metric([state], counts.get(state, 0))
        out.append(items)
        out.append(GaugeMetricFamily("olmocr_pipeline_work_items_remaining", "Work items not done yet "
                                     "(pending + leased), all workers", value=counts.get("pending", 0)
                                     + counts.get("leased", 0)))
    totals = p.live_totals()  # pages count as this process answers them, not only when their item is done
    if totals is not None:  # the whole workspace (olmocr.pipeline.workspace.totals), all pipelines
        pages = GaugeMetricFamily("olmocr_pipeline_workspace_pages", "Pages of the whole workspace by state: "
                                  "total queued, done, remaining (all pipelines), read every --progress_interval "
                                  "seconds", labels=["state"])
        for state, value in (("total", totals.total), ("done", totals.done), ("remaining", totals.remaining)):
            pages.add_metric([state], value)
        out.append(pages)
        out.append(GaugeMetricFamily("olmocr_pipeline_workspace_pages_estimated", "1 while the workspace's page "
                                     "total is an estimate (queued from a sample; exact once workers counted every "
                                     "item), else 0", value=1 if totals.estimated else 0))
        if totals.rate is not None:
            out.append(GaugeMetricFamily("olmocr_pipeline_workspace_pages_per_second", "Pages per second of the "
                                         "whole workspace over the last 10 minutes (from the done flags; until a work item finishes, this "
                                         "process's rate)",
                                         value=totals.rate))
        if totals.eta_seconds is not None:
            out.append(GaugeMetricFamily("olmocr_pipeline_workspace_eta_seconds", "Seconds until every page of "
                                         "the workspace is done at the current rate", value=totals.eta_seconds))
    # --- fallback pages by reason (issue #30; olmocr/pipeline/pages/page.py counts them)
    by_reason = CounterMetricFamily("olmocr_pipeline_pages_fallback_by_reason", "Fallback pages by reason: model "
                                    "(no usable answer), refused (4xx), render (cannot render), time_limit "
                                    "(--render_timeout)", labels=["reason"])
    for reason in FALLBACK_REASONS:
        by_reason.add_metric([reason], metrics.fallback_by_reason.get(reason, 0))
    out.append(by_reason)
    # --- end fallback pages by reason
    out.append(GaugeMetricFamily("olmocr_pipeline_start_time_seconds", "Unix time this pipeline run started",
                                 value=metrics.start_time))
    return out


class _RunCollector:
    def __init__(self, metrics: PipelineMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        return run_metrics(self.metrics)


class MetricsExporter:
    """The HTTP endpoint and the queue refresher of one run; ``await close()`` stops both."""

    def __init__(self, runner: web.AppRunner, tasks: list[asyncio.Task[None]]) -> None:
        self._runner = runner
        self._tasks = tasks

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self._runner.cleanup()


async def start_exporter(metrics: PipelineMetrics, queue: Any, host: str, port: int, token: str | None,
                         queue_interval: float) -> MetricsExporter:
    """Serve ``/metrics`` (raises :class:`olmocr.endpoints.EndpointConfigError` if it cannot bind)."""
    app = web.Application(middlewares=[bearer_middleware(token)])

    async def handle(_request: web.Request) -> web.Response:
        return metrics_response(metrics.registry)

    app.router.add_get("/metrics", handle)
    runner = await start_app(app, host, port)
    logger.info("metrics on http://%s:%d/metrics%s", host, port, " (bearer token required)" if token else "")
    return MetricsExporter(runner, [asyncio.create_task(metrics.refresh_queue_forever(queue, queue_interval))])


async def start_for_runner(runner: Any) -> MetricsExporter:
    """Wire the hooks of a :class:`olmocr.pipeline.runner.Runner` and serve its metrics."""
    config = runner.config
    # One series per server of the fleet (olmocr.pipeline.servers.fleet).
    metrics = PipelineMetrics(runner.progress, lambda: runner.fleet.servers)
    metrics.fallback_by_reason = runner.documents.pages.fallback_by_reason  # issue #30
    runner.renderer.observe_render = metrics.render_seconds.observe
    for server in runner.fleet.servers:
        server.observe_request = metrics.observe_request(server.url)
    runner.fleet.on_new_server = lambda server: setattr(server, "observe_request",  # dns+http:// servers
                                                         metrics.observe_request(server.url))
    return await start_exporter(metrics, runner.queue, config.metrics_host, config.metrics_port,
                                config.metrics_token, config.progress_interval)
