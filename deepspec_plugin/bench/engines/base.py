"""What every engine gives the harness: token ids in, tokens, counts and timings out.

An engine runs one batch at a time, with speculation (``k`` draft tokens per step) or without
(``k=None``: plain decoding of the target, the baseline of every speedup). The harness owns the
protocol (prompts, chat templates, turns, repetitions, statistics); engines only generate.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from deepspec_plugin.metrics import SpecCounts


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    k: int | None = None  # draft tokens per step; None: plain decoding of the target alone
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()  # generation of a request ends after one of these


@dataclass
class Generation:
    token_ids: list[int]  # new tokens only; a stop token that ended it is included
    counts: SpecCounts | None = None  # this request's counts; None where the engine has only totals


@dataclass
class BatchResult:
    generations: list[Generation]
    elapsed_s: float  # wall time of the whole batch, prefill included
    counts: SpecCounts = field(default_factory=SpecCounts)  # batch totals (empty when k is None)
    # Mean wall time of one single-token forward step of each model, where the engine can time
    # it (on GPU after a synchronize). The harness takes the cost ratio c from these.
    draft_step_s: float | None = None
    target_step_s: float | None = None
    # Mean wall time of one verification pass of the target over k + 1 tokens: with
    # target_step_s of plain decoding, the verification cost v of the predicted speedup.
    verify_step_s: float | None = None

    @property
    def num_new_tokens(self) -> int:
        return sum(len(g.token_ids) for g in self.generations)


# How a draft proposes at T > 0: "probabilistic" (sampled from its distribution q, which the
# exact rule then uses) or "greedy" (its argmax, q one-hot on it: vLLM 0.32's default,
# ``draft_sample_method`` in vllm/config/speculative.py). Both keep the output exact; greedy
# drafting accepts less at T > 0. At T = 0 they are the same.
DRAFT_SAMPLE_METHODS = ("probabilistic", "greedy")


def check_draft_sample_method(method: str) -> str:
    if method not in DRAFT_SAMPLE_METHODS:
        from deepspec_plugin.errors import DspecError

        raise DspecError(f"unknown draft sampling rule {method!r}",
                         f"use {' or '.join(DRAFT_SAMPLE_METHODS)}")
    return method


class Engine(ABC):
    """A target (and optionally a draft) loaded once, generating many batches."""

    name: str = "engine"
    # True where per-request counts are exact; else only BatchResult.counts is.
    per_request_counts: bool = True
    # False where the engine cannot decode without the draft (a running server configured with
    # speculation): the harness then reports no measured speedup, and says why.
    supports_baseline: bool = True
    # Set where k is fixed by the engine (a server's configuration): the harness uses it.
    fixed_k: int | None = None

    @abstractmethod
    def generate(self, prompts: list[list[int]], cfg: GenerationConfig) -> BatchResult: ...

    def describe(self) -> dict:
        """Engine facts for the report's environment block (versions, device, threads...)."""
        return {"engine": self.name}

    def close(self) -> None:
        """Free the models and any processes; the engine is unusable afterwards."""
