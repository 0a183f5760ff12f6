"""Reading a server's Prometheus text exposition (``/metrics``) into plain samples.

Parsing is prometheus_client's (``text_string_to_metric_families``); this module only flattens
the families into samples named as they appear on the wire (``..._total``, ``..._sum``,
``..._count``) and sums them over label sets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass


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
