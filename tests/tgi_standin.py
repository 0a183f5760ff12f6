"""A STAND-IN for TGI's /metrics page: the series TGI records, at the same events, rendered in the
same text. TGI cannot run here; this is not TGI and only mimics its page. The TGI sidecar's tests
and the endpoint engine's tests read the same page through it.

What TGI records, read in huggingface/text-generation-inference at commit db931fcf42da:

* ``backends/v3/src/queue.rs::State::next_batch``: ``tgi_batch_next_size`` (histogram, buckets
  1..1024 from ``router/src/server.rs::start``) gets the size of each batch sent to prefill;
* ``backends/v3/src/backend.rs::prefill``/``decode``: ``tgi_batch_inference_count{method}``;
  ``send_responses``: ``tgi_request_skipped_tokens`` gets ``n - 1`` per request per forward pass
  (0 at prefill, the accepted draft tokens at a decode step);
* ``router/src/server.rs::generate_internal``: ``tgi_request_count`` on arrival,
  ``tgi_request_success`` and ``tgi_request_generated_tokens`` (buckets max_total_tokens / 100 x
  1..100) when a request ends; ``backends/v3/src/lib.rs``: ``tgi_batch_max_total_tokens`` at start.

and renders it as metrics-exporter-prometheus 0.15.3 (``recorder.rs::render``) does: counters,
then gauges, then distributions, a metric only once recorded, no ``_total`` suffix, and
``tgi_request_skipped_tokens`` as a *summary* (its bucket matcher is commented out in
``server.rs``, so the exporter's default applies: quantiles 0, 0.5, 0.9, 0.95, 0.99, 0.999, 1).
"""

from __future__ import annotations

import math

QUANTILES = (0.0, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0)


def _num(x: float) -> str:
    """Rust's f64 Display: no exponent, no trailing .0."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


class StandInTgi:
    """TGI's metrics (see the module docstring) for a TGI started with ``--speculate speculate``:
    the same series at the same events, rendered in the same text."""

    def __init__(self, max_total_tokens: int = 2048, skipped_form: str = "summary",
                 speculate: int = 4):
        self.max_total_tokens = max_total_tokens
        self.skipped_form = skipped_form
        self.speculate = speculate
        self.requests = self.success = 0
        self.calls = {"prefill": 0, "decode": 0}
        self.skipped: list[int] = []
        self.next_sizes: list[int] = []
        self.generated: list[int] = []

    def queue_batch(self, size: int) -> None:
        """Requests arrive and the queue forms a prefill batch (before the prefill runs)."""
        self.requests += size
        self.next_sizes.append(size)

    def prefill_done(self, size: int) -> None:
        self.calls["prefill"] += 1
        self.skipped += [0] * size

    def prefill(self, size: int) -> None:
        self.queue_batch(size)
        self.prefill_done(size)

    def decode(self, accepted: list[int]) -> None:
        """One decode forward pass: the accepted draft tokens of each request in the batch."""
        assert all(0 <= a <= self.speculate for a in accepted)
        self.calls["decode"] += 1
        self.skipped += accepted

    def finish(self, generated_tokens: int) -> None:
        self.success += 1
        self.generated.append(generated_tokens)

    def render(self) -> str:
        out = []
        if self.requests:
            out += ["# HELP tgi_request_count Total number of requests",
                    "# TYPE tgi_request_count counter", f"tgi_request_count {self.requests}", ""]
        if self.success:
            out += ["# HELP tgi_request_success Number of successful requests",
                    "# TYPE tgi_request_success counter",
                    f"tgi_request_success {self.success}", ""]
        if any(self.calls.values()):
            out += ["# HELP tgi_batch_inference_count Inference calls per method (prefill or "
                    "decode)", "# TYPE tgi_batch_inference_count counter"]
            out += [f'tgi_batch_inference_count{{method="{m}"}} {n}'
                    for m, n in self.calls.items() if n]
            out.append("")
        out += ["# HELP tgi_batch_max_total_tokens ", "# TYPE tgi_batch_max_total_tokens gauge",
                "tgi_batch_max_total_tokens 16000", ""]
        if self.skipped:
            out += ["# HELP tgi_request_skipped_tokens Speculated tokens per request"]
            if self.skipped_form == "summary":
                out += self._summary("tgi_request_skipped_tokens", self.skipped)
            else:
                out += self._histogram("tgi_request_skipped_tokens", self.skipped,
                                       [float(x) for x in range(self.speculate + 1)])
        if self.next_sizes:
            out += ["# HELP tgi_batch_next_size Batch size of the next batch"]
            out += self._histogram("tgi_batch_next_size", self.next_sizes,
                                   [float(x + 1) for x in range(1024)])
        if self.generated:
            out += ["# HELP tgi_request_generated_tokens Generated tokens per request"]
            out += self._histogram("tgi_request_generated_tokens", self.generated,
                                   [self.max_total_tokens / 100.0 * (x + 1) for x in range(100)])
        return "\n".join(out) + "\n"

    @staticmethod
    def _summary(name: str, values: list[int]) -> list[str]:
        ordered = sorted(values)
        lines = [f"# TYPE {name} summary"]
        for q in QUANTILES:
            v = ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1 if q else 0)]
            lines.append(f'{name}{{quantile="{_num(q)}"}} {_num(v)}')
        return lines + [f"{name}_sum {_num(sum(values))}", f"{name}_count {len(values)}", ""]

    @staticmethod
    def _histogram(name: str, values: list[int], bounds: list[float]) -> list[str]:
        lines = [f"# TYPE {name} histogram"]
        lines += [f'{name}_bucket{{le="{_num(b)}"}} {sum(v <= b for v in values)}' for b in bounds]
        lines += [f'{name}_bucket{{le="+Inf"}} {len(values)}',
                  f"{name}_sum {_num(sum(values))}", f"{name}_count {len(values)}", ""]
        return lines
