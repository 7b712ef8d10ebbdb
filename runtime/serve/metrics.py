"""Prometheus metrics with Triton's names and labels, so a Grafana dashboard made for Triton shows this server.

The values are read from the data plane's own counts when Prometheus scrapes (`/metrics`), so the metrics
and the statistics extension never disagree. Triton's cumulative metrics (`nv_inference_count`, the
`*_duration_us` sums) keep Triton's exact names: `prometheus_client` would rename a family typed `counter`
to `*_total`, so they are exposed untyped, which PromQL's `rate()` and `increase()` treat the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

# name -> help, as Triton describes its metrics
TRITON_COUNTERS = {
    "nv_inference_request_success": "Number of successful inference requests, all batch sizes",
    "nv_inference_count": "Number of inferences performed (does not include cached requests)",
    "nv_inference_exec_count": "Number of model executions performed (does not include cached requests)",
    "nv_inference_request_duration_us": "Cumulative inference request duration in microseconds",
    "nv_inference_queue_duration_us": "Cumulative inference queuing duration in microseconds",
    "nv_inference_compute_infer_duration_us": "Cumulative compute inference duration in microseconds",
}


@dataclass
class Counts:
    """A snapshot of what the metrics report for one model version."""

    model: str
    version: str
    success: int = 0
    images: int = 0
    executions: int = 0
    request_us: int = 0
    queue_us: int = 0
    compute_us: int = 0
    pending: int = 0  # requests held: decoded, queued or running
    receiving: int = 0  # requests whose body is still arriving
    failures: dict[tuple[str, str], int] = field(default_factory=dict)  # (Triton's reason, ours) -> requests


class TritonCollector:
    """A `prometheus_client` collector over a function that snapshots the data plane's counts."""

    def __init__(self, counts: Callable[[], Counts]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        c = self.counts()
        labels = {"model": c.model, "version": c.version}
        values = {"nv_inference_request_success": c.success, "nv_inference_count": c.images,
                  "nv_inference_exec_count": c.executions, "nv_inference_request_duration_us": c.request_us,
                  "nv_inference_queue_duration_us": c.queue_us, "nv_inference_compute_infer_duration_us": c.compute_us}
        for name, text in TRITON_COUNTERS.items():
            metric = Metric(name, text, "unknown")
            metric.add_sample(name, labels, values[name])
            yield metric
        failure = Metric("nv_inference_request_failure", "Number of failed inference requests, all batch sizes", "unknown")
        rejected = CounterMetricFamily("deit_serve_rejected_requests", "Requests answered with an error, by reason",
                                       labels=["model", "version", "reason"])
        by_triton: dict[str, int] = {}
        for (triton_reason, reason), n in sorted(c.failures.items()):
            by_triton[triton_reason] = by_triton.get(triton_reason, 0) + n
            rejected.add_metric([c.model, c.version, reason], n)
        for triton_reason in ("REJECTED", "CANCELED", "BACKEND", "OTHER"):
            failure.add_sample(failure.name, {**labels, "reason": triton_reason}, by_triton.get(triton_reason, 0))
        yield failure
        yield rejected
        pending = GaugeMetricFamily("nv_inference_pending_request_count", "Instantaneous number of pending requests "
                                    "awaiting execution per-model", labels=["model", "version"])
        pending.add_metric([c.model, c.version], c.pending)
        yield pending
        receiving = GaugeMetricFamily("deit_serve_receiving_requests", "Requests whose body is still arriving",
                                      labels=["model", "version"])
        receiving.add_metric([c.model, c.version], c.receiving)
        yield receiving


def registry_for(counts: Callable[[], Counts]) -> CollectorRegistry:
    """A registry of its own per data plane (not the process-wide default), holding the Triton collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TritonCollector(counts))
    return registry


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The Prometheus text format of `registry`, and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
