"""Prometheus metrics of one server (its own registry, so several apps can live in a process).

Counters and histograms are updated by the request handlers; queue depth, running batch,
engine steps, prefix-cache queries/hits and aborted requests are read from the worker's
``stats`` at scrape time, so they are always the scheduler's own numbers. Names follow vLLM's
(``vllm:time_to_first_token_seconds`` → ``camelid_time_to_first_token_seconds``).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_GAP = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5, 5)


class _WorkerStats(Collector):
    def __init__(self, worker: object) -> None:
        self.worker = worker

    def collect(self) -> Iterator:
        stats = getattr(self.worker, "stats", None)

        def get(name: str) -> float:
            return float(getattr(stats, name, 0) or 0)

        yield GaugeMetricFamily(
            "camelid_num_requests_waiting", "Requests waiting to start", value=get("waiting")
        )
        yield GaugeMetricFamily(
            "camelid_num_requests_running", "Requests in the running batch", value=get("running")
        )
        counters = {
            "camelid_engine_steps": ("steps", "Engine steps run"),
            "camelid_prefix_cache_queries": ("prefix_queries", "Prompts looked up in the cache"),
            "camelid_prefix_cache_hits": ("prefix_hits", "Prompts that reused cached KV"),
            "camelid_prefix_cache_cached_tokens": (
                "prefix_cached_tokens",
                "Prompt tokens served from the prefix cache",
            ),
            "camelid_aborted_requests": ("aborted", "Requests aborted (client gone, shutdown)"),
        }
        for name, (attr, doc) in counters.items():
            yield CounterMetricFamily(name, doc, value=get(attr))


class ServerMetrics:
    """The metrics of one app; :meth:`render` is the ``/metrics`` body."""

    def __init__(self, worker: object) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "camelid_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.prompt_tokens = Counter("camelid_prompt_tokens", "Prompt tokens", registry=r)
        self.generation_tokens = Counter(
            "camelid_generation_tokens", "Generated tokens", registry=r
        )
        self.ttft = Histogram(
            "camelid_time_to_first_token_seconds",
            "Time from request to its first token",
            buckets=_LATENCY,
            registry=r,
        )
        self.itl = Histogram(
            "camelid_inter_token_latency_seconds",
            "Time between a request's successive tokens",
            buckets=_TOKEN_GAP,
            registry=r,
        )
        self.e2e = Histogram(
            "camelid_e2e_request_latency_seconds",
            "Time from request to its last token",
            buckets=_LATENCY,
            registry=r,
        )
        r.register(_WorkerStats(worker))

    def render(self) -> bytes:
        return generate_latest(self.registry)
