"""Reading a server's Prometheus text exposition (``/metrics``) into plain samples.

Parsing is prometheus_client's (``text_string_to_metric_families``); this module only flattens
the families into samples named as they appear on the wire (``..._total``, ``..._sum``,
``..._count``) and sums them over label sets. ``tgi_totals`` reads the series of TGI's page that
the bench's endpoint engine and the TGI sidecar turn into counts (``metrics.tgi_spec_counts``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from deepspec_plugin import metrics


@dataclass(frozen=True)
class Sample:
    name: str  # as exposed, suffix included (vllm:spec_decode_num_drafts_total)
    labels: dict[str, str]
    value: float


def parse_samples(text: str) -> list[Sample]:
    """Every sample of an exposition text; ValueError if it is not valid exposition text."""
    from prometheus_client.parser import text_string_to_metric_families

    return [
        Sample(s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def total(
    samples: Iterable[Sample], name: str, where: Callable[[dict[str, str]], bool] | None = None
) -> float | None:
    """Sum of the samples called ``name`` whose labels pass ``where``; None if there is none."""
    values = [s.value for s in samples if s.name == name and (where is None or where(s.labels))]
    return sum(values) if values else None


def by_label(
    samples: Iterable[Sample],
    name: str,
    label: str,
    where: Callable[[dict[str, str]], bool] | None = None,
) -> dict[str, float]:
    """Sums of the samples called ``name`` by the value of ``label`` (other labels summed)."""
    out: dict[str, float] = {}
    for s in samples:
        if s.name == name and label in s.labels and (where is None or where(s.labels)):
            out[s.labels[label]] = out.get(s.labels[label], 0.0) + s.value
    return out


def label_values(samples: Iterable[Sample], name: str, label: str) -> set[str]:
    """The distinct values of ``label`` on the samples called ``name``."""
    return {s.labels[label] for s in samples if s.name == name and label in s.labels}


def has_prefix(samples: Iterable[Sample], prefix: str) -> bool:
    return any(s.name.startswith(prefix) for s in samples)


# --- TGI's page ----------------------------------------------------------------------------------

TGI_SKIPPED = "tgi_request_skipped_tokens"
TGI_NEXT_SIZE = "tgi_batch_next_size"
TGI_GENERATED = "tgi_request_generated_tokens"
TGI_INFERENCE_COUNT = "tgi_batch_inference_count"
TGI_REQUEST_COUNT = "tgi_request_count"


@dataclass
class TgiTotals:
    """Cumulative values of one read of TGI's /metrics, summed over label sets; None: absent."""

    request_steps: int | None = None  # tgi_request_skipped_tokens_count
    accepted: int | None = None  # tgi_request_skipped_tokens_sum
    prefills: int | None = None  # tgi_batch_next_size_sum: requests sent to prefill
    generated_tokens: int | None = None  # tgi_request_generated_tokens_sum
    prefill_calls: int | None = None  # tgi_batch_inference_count{method="prefill"}
    requests: int | None = None  # tgi_request_count (arrivals)
    is_tgi: bool = False  # the page has tgi_* series

    @property
    def has_speculation(self) -> bool:
        return self.request_steps is not None and self.accepted is not None

    @property
    def served(self) -> bool:
        """True once TGI has run a prefill (then ``tgi_request_skipped_tokens`` must exist)."""
        return any(v for v in (self.prefills, self.prefill_calls, self.generated_tokens))

    @property
    def decode_steps(self) -> int:
        """The request-steps that drafted (``metrics.tgi_decode_steps``)."""
        return metrics.tgi_decode_steps(self.request_steps or 0, self.prefills)

    def counts(self, speculate: int) -> metrics.SpecCounts:
        """The counts since TGI started (``metrics.tgi_spec_counts``)."""
        return metrics.tgi_spec_counts(
            self.request_steps or 0, self.accepted or 0, self.prefills, speculate
        )


def tgi_totals(samples: Iterable[Sample]) -> TgiTotals:
    """The TGI series of a page, from either form of ``tgi_request_skipped_tokens`` (TGI's
    exporter renders it as a summary; its docs call it a histogram: both have ``_sum`` and
    ``_count``) and counters with or without ``_total``."""
    samples = list(samples)

    def value(*names: str, where=None) -> int | None:
        found = [total(samples, n, where) for n in names]
        found = [v for v in found if v is not None]
        return int(round(sum(found))) if found else None

    return TgiTotals(
        request_steps=value(f"{TGI_SKIPPED}_count"),
        accepted=value(f"{TGI_SKIPPED}_sum"),
        prefills=value(f"{TGI_NEXT_SIZE}_sum"),
        generated_tokens=value(f"{TGI_GENERATED}_sum"),
        prefill_calls=value(
            TGI_INFERENCE_COUNT,
            f"{TGI_INFERENCE_COUNT}_total",
            where=lambda labels: labels.get("method") == "prefill",
        ),
        requests=value(TGI_REQUEST_COUNT, f"{TGI_REQUEST_COUNT}_total"),
        is_tgi=has_prefix(samples, "tgi_"),
    )
