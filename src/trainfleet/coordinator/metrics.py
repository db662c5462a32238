"""Prometheus metrics of one coordinator (its own registry, so apps in tests stay apart)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from trainfleet.queue.base import JobQueue

JOB_STATES = ("waiting", "pending", "claimed", "running", "completed", "failed", "cancelled")


class _QueueCollector(Collector):
    """Job and worker gauges, read from the queue at scrape time."""

    def __init__(self, queue: JobQueue):
        self.queue = queue

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("trainfleet_jobs", "Jobs by state", labels=["state"])
        counts = self.queue.counts()
        for state in JOB_STATES:
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs
        workers = GaugeMetricFamily("trainfleet_workers", "Workers by state", labels=["state"])
        by_state: dict[str, int] = {"online": 0, "offline": 0, "stopped": 0}
        for w in self.queue.list_workers():
            by_state[w.state] = by_state.get(w.state, 0) + 1
        for state, n in by_state.items():
            workers.add_metric([state], n)
        yield workers


class Metrics:
    def __init__(self, queue: JobQueue):
        self.registry = CollectorRegistry()
        self.registry.register(_QueueCollector(queue))
        self.requests = Counter(
            "trainfleet_http_requests",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "trainfleet_http_request_seconds",
            "HTTP request latency",
            ["route"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )
        self.claims = Counter("trainfleet_claims", "Jobs claimed", registry=self.registry)
        self.upload_bytes = Counter(
            "trainfleet_upload_bytes", "Artifact bytes accepted", registry=self.registry
        )
        self.contributions = Counter(
            "trainfleet_run_contributions",
            "Pseudo-gradients judged at arrival, by verdict",
            ["verdict"],
            registry=self.registry,
        )
        self.rounds_closed = Counter(
            "trainfleet_run_rounds_closed", "Rounds of runs closed", registry=self.registry
        )
        self.requeues = Counter(
            "trainfleet_lost_attempts",
            "Attempts requeued or failed by the reaper",
            registry=self.registry,
        )

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
