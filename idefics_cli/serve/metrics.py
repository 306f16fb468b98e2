"""`GET /metrics`: the server's numbers in the Prometheus text format (prometheus-client; names in docs/serve.md).

Contract: `Metrics(state)` owns its `CollectorRegistry` (one per app). `requests` counts /v1/* responses by status
(app.py's access log), `ended(job)` a job's timings and tokens, `pages` pages decoded; the queue, running
rows and prefix cache are read at each scrape. `render()` returns the text and its content type.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    def __init__(self, state):
        self.state = state
        self.registry = reg = CollectorRegistry()
        self.requests = Counter("idefics_requests", "API requests (/v1/*) answered, by HTTP status", ["status"],
                                registry=reg)
        self.ttft = Histogram("idefics_time_to_first_token_seconds", "From a request being queued to its first "
                              "token", buckets=TTFT_BUCKETS, registry=reg)
        self.per_token = Histogram("idefics_time_per_output_token_seconds", "Mean time between a request's "
                                   "generated tokens after the first (one observation per request)",
                                   buckets=TOKEN_BUCKETS, registry=reg)
        self.prompt = Counter("idefics_prompt_tokens", "Prompt tokens of the requests prefilled", registry=reg)
        self.generated = Counter("idefics_generated_tokens", "Tokens generated", registry=reg)
        self.pages = Counter("idefics_pages_rendered", "Pages and images decoded from requests", registry=reg)
        reg.register(self)  # collect(): the numbers read at each scrape

    def ended(self, job) -> None:
        """A job left the scheduler (answered, cancelled or failed): its timings and token counts."""
        if job.first_token_s is None:
            return
        self.ttft.observe(job.first_token_s)
        self.prompt.inc(len(job.ids))
        self.generated.inc(len(job.token_ids))
        if len(job.token_ids) > 1:
            self.per_token.observe((job.total_s - job.first_token_s) / (len(job.token_ids) - 1))

    def collect(self):
        load = self.state.scheduler.load() if self.state.scheduler is not None else {}
        stats = load.get("cache", {})
        yield GaugeMetricFamily("idefics_queue_length", "Requests waiting for a place in the batch",
                                load.get("waiting", 0))
        yield GaugeMetricFamily("idefics_running_rows", "Requests being generated (rows of the decode loop)",
                                load.get("running", 0))
        yield CounterMetricFamily("idefics_prefix_cache_hits", "Prompts prefilled from the prefix cache",
                                  stats.get("hits", 0))
        yield CounterMetricFamily("idefics_prefix_cache_misses", "Image prefixes looked up and not found",
                                  stats.get("misses", 0))
        yield GaugeMetricFamily("idefics_prefix_cache_bytes", "Bytes held by the prefix cache", stats.get("bytes", 0))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

