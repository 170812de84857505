"""``GET /metrics``: the engine's counters in Prometheus's text format (``prometheus-client``)."""

from __future__ import annotations


class Metrics:
    """A registry of its own (several servers in one process stay apart), read from the engine on scrape."""

    def __init__(self, engine, guardrails=None):
        from prometheus_client import CollectorRegistry, Gauge, Histogram
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        self.engine = engine
        self.registry = CollectorRegistry()
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
        self.ttft = Histogram("herd_time_to_first_token_seconds", "Time from a request's arrival to its first token",
                              registry=self.registry, buckets=buckets)
        self.itl = Histogram("herd_inter_token_latency_seconds", "Time between two tokens of a request",
                             registry=self.registry, buckets=buckets)
        self.max_batch = Gauge("herd_batch_size_max", "The largest decode batch so far", registry=self.registry)
        engine.observers.append(self._observe)

        class _Engine:
            def collect(_self):
                s = engine.stats
                yield CounterMetricFamily("herd_requests", "Requests accepted", value=s["requests"])
                yield CounterMetricFamily("herd_prompt_tokens", "Prompt tokens prefilled", value=s["prompt_tokens"])
                yield CounterMetricFamily("herd_generation_tokens", "Tokens generated",
                                          value=s["generation_tokens"])
                finished = CounterMetricFamily("herd_requests_finished", "Requests finished, by reason",
                                               labels=["reason"])
                for key, value in s.items():
                    if key.startswith("finished_"):
                        finished.add_metric([key.removeprefix("finished_")], value)
                yield finished
                yield GaugeMetricFamily("herd_requests_running", "Requests in the running batch",
                                        value=len(engine.running))
                yield GaugeMetricFamily("herd_requests_waiting", "Requests waiting for a batch row or KV blocks",
                                        value=len(engine.waiting))
                yield GaugeMetricFamily("herd_kv_blocks_used", "KV-cache blocks in use", value=engine.pool.used_blocks)
                yield GaugeMetricFamily("herd_kv_blocks_total", "KV-cache blocks", value=engine.pool.n_blocks)
                steps = CounterMetricFamily("herd_decode_steps", "Decode steps, by batch size", labels=["batch"])
                for size, count in sorted(engine.batch_sizes.items()):
                    steps.add_metric([str(size)], count)
                yield steps
                prefills = CounterMetricFamily("herd_prefill_forwards", "Prefill forwards, by requests prefilled "
                                               "together", labels=["batch"])
                for size, count in sorted(engine.prefill_sizes.items()):
                    prefills.add_metric([str(size)], count)
                yield prefills

        self.registry.register(_Engine())
        if guardrails is not None:
            self.registry.register(_Guardrails(guardrails))

    def _observe(self, name: str, seconds: float) -> None:
        (self.ttft if name == "ttft" else self.itl).observe(seconds)
        if self.engine.batch_sizes:
            self.max_batch.set(max(self.engine.batch_sizes))

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Guardrails:
    """The moderation's counters: guard checks by stage and verdict, its batches by size and their seconds,
    Code Shield scans by recommended treatment."""

    def __init__(self, guardrails):
        self.g = guardrails

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, SummaryMetricFamily

        checks = CounterMetricFamily("herd_guard_checks", "Guard checks, by stage and verdict",
                                     labels=["stage", "verdict"])
        scans = CounterMetricFamily("herd_code_shield_scans", "Code Shield scans of responses, by treatment",
                                    labels=["treatment"])
        for key, value in sorted(self.g.stats.items()):
            if key.startswith("guard_"):
                checks.add_metric(key.split("_", 2)[1:], value)
            else:
                scans.add_metric([key.removeprefix("code_shield_")], value)
        yield checks
        yield scans
        batches = CounterMetricFamily("herd_guard_batches", "Guard forwards, by checks read together",
                                      labels=["batch"])
        for size, count in sorted(self.g.batch_sizes.items()):
            batches.add_metric([str(size)], count)
        yield batches
        seconds = list(self.g.seconds)
        yield SummaryMetricFamily("herd_guard_batch_seconds", "Seconds a guard batch took (the last 1,000)",
                                  count_value=len(seconds), sum_value=sum(seconds))
