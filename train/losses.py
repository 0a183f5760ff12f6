"""Distillation losses between a draft's logits and its target's signal, per token, masked.

Every loss compares the draft's next-token distribution q with the target's p at the temperature
the draft will serve at: ``q = softmax(draft_logits / T)``, ``p = softmax(target_logits / T)`` (or
the stored top-k probabilities, which the data pipeline records at that same T). ``T = 0`` means
greedy serving; greedy acceptance is argmax agreement, which has no useful gradient, so the
distributions are taken at ``T = 1`` then (the usual choice, DistillSpec section 4).

**Target signal.** Either full target logits ``[B, T, V]``, or the compact form stored by the data
pipeline: ``topk_ids`` ``[B, T, K]`` and ``topk_probs`` ``[B, T, K]`` with the leftover mass
``1 - sum(topk_probs)``. `coarsen` turns either into ``Buckets``: p and q over the same outcomes.

* Full logits: the buckets are the V vocabulary entries; every divergence is the exact one.
* Top-k: the buckets are the K stored ids plus one "rest" bucket holding all other tokens:
  ``p_rest = 1 - sum(topk_probs)``, ``q_rest = 1 - sum(q[topk_ids])`` (computed as a log-sum-exp
  over the non-top-k entries, so it stays accurate when it is tiny). Every divergence is then
  computed exactly on this (K+1)-bucket coarsening. Merging outcomes never increases an
  f-divergence (data processing inequality), so TVD, KL and JSD on the coarsening are lower bounds
  of the full-vocabulary ones, and equal to them when K = V. Training on it matches q to p on the
  top-k ids and matches the total mass elsewhere, which is all the signal the stored data holds.

**Losses** (`make_loss`): ``ce`` (hard labels: given label ids, else the target's argmax / the
stored top-1 id), ``fkl`` = KL(p||q), ``rkl`` = KL(q||p), ``jsd:BETA`` = beta KL(p||m) +
(1 - beta) KL(q||m) with m = beta p + (1 - beta) q (DistillSpec / GKD), ``tvd`` = 0.5 sum |p - q|
= 1 - sum min(p, q), which is exactly 1 - the acceptance probability of speculative sampling
(Leviathan et al. 2023), and weighted sums such as ``"tvd+0.5*fkl"``.

Numerics: everything is computed in float32 (bf16/fp16 logits are upcast), from log-softmax; logs
of zero probabilities are clamped at ``LOG_FLOOR`` so zero entries give finite values and finite
gradients. The per-token values are averaged over the tokens where ``mask`` is true (the response
tokens); ``draft_logits[:, t]`` and the target signal at ``t`` must predict the same next token.

torch is imported inside functions: the light CLI may import this module.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deepspec_plugin.errors import DspecError

if TYPE_CHECKING:
    import torch

# log(1e-30): where a probability is zero its log is clamped here (1e-30 is well inside float32).
LOG_FLOOR = math.log(1e-30)
# Leftover top-k mass below this is taken as float rounding of probabilities that sum to 1 (the
# sum of K float32 probabilities is only good to about K * 1e-7), so K = V reproduces the full-
# vocabulary losses. A real leftover this small is unresolvable from the stored data anyway; TVD
# moves by at most this much, rkl/jsd see the rest bucket as (almost) impossible for the target.
REST_SNAP = 1e-6
# Stand-in for -inf in the rest-bucket log-sum-exp: finite, so an empty rest bucket (K = V) gives
# zero gradients instead of NaN.
_MASKED_LOGIT = -1e30

LOSS_NAMES = ("ce", "fkl", "rkl", "jsd", "tvd")
VALID_FORMS = (
    "ce, fkl, rkl, tvd, jsd:BETA (0 < BETA < 1), or a weighted sum of them such as "
    "'tvd+0.5*fkl' or '0.7*fkl+0.3*jsd:0.5' (weights > 0)"
)


# --- the target signal --------------------------------------------------------------------------


@dataclass
class TargetSignal:
    """What the target says about each position: full logits, or top-k probabilities, or labels.

    ``temperature``, when known, is the temperature the top-k probabilities were computed at; a
    loss at a lower temperature sharpens them (`_retemper`), one at a higher temperature refuses
    them (the mass that moves would go to tokens that were not stored).
    ``labels`` (int ``[B, T]``, negative = ignore) are hard labels for ``ce``.
    """

    logits: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_probs: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    temperature: float | None = None

    @property
    def has_distribution(self) -> bool:
        return self.logits is not None or self.topk_ids is not None


def as_target_signal(target: Any) -> TargetSignal:
    """Accept a `TargetSignal`, a float logits tensor, an int label tensor, or a mapping."""
    import torch

    if isinstance(target, TargetSignal):
        signal = target
    elif isinstance(target, torch.Tensor):
        if target.is_floating_point():
            signal = TargetSignal(logits=target)
        else:
            signal = TargetSignal(labels=target)
    elif isinstance(target, Mapping):
        known = {"logits", "topk_ids", "topk_probs", "labels", "temperature"}
        signal = TargetSignal(**{k: v for k, v in target.items() if k in known})
    else:
        raise DspecError(
            f"unsupported target signal of type {type(target).__name__}",
            "pass full target logits [B, T, V], a TargetSignal, or a mapping with "
            "topk_ids/topk_probs (and optionally labels)",
        )
    if (signal.topk_ids is None) != (signal.topk_probs is None):
        raise DspecError(
            "the target signal has only one of topk_ids and topk_probs",
            "store both, with the same [B, T, K] shape",
        )
    if not signal.has_distribution and signal.labels is None:
        raise DspecError(
            "the target signal is empty", "give target logits, top-k ids and probs, or labels"
        )
    return signal


def serving_temperature(temperature: float) -> float:
    """The temperature the distributions are taken at: T, or 1 for greedy serving (T = 0)."""
    t = float(temperature)
    if not math.isfinite(t) or t < 0:
        raise DspecError(
            f"invalid loss temperature {temperature!r}",
            "use the draft's serving temperature: 0 (greedy) or a positive number",
        )
    return 1.0 if t == 0 else t


def _check_temperature(signal: TargetSignal, temperature: float) -> None:
    """Stored top-k can be sharpened to a lower temperature (see `_retemper`), not flattened."""
    if signal.temperature is not None and signal.topk_ids is not None:
        stored = serving_temperature(signal.temperature)
        if serving_temperature(temperature) > stored + 1e-6:
            raise DspecError(
                f"the stored top-k probabilities are at temperature {signal.temperature}, "
                f"the loss at {temperature}: a higher temperature moves mass into the tokens "
                "that were not stored",
                "train at the data's temperature or below, or regenerate the data at the "
                "serving temperature",
            )


def _retemper(p_top: torch.Tensor, p_rest: torch.Tensor, stored: float, t: float):
    """Top-k probabilities at temperature ``stored`` taken to a lower temperature ``t``.

    p_i(t) is proportional to p_i(stored) ** a with a = stored / t >= 1. The top-k part is exact;
    the rest bucket's sum of p_j ** a is unknown, but every rest token has p_j <= p_min (the
    smallest stored probability), so it is at most p_min ** (a - 1) * rest: that bound is used.
    With k = 32 on the reference target it moves the rest bucket by well under 1e-3.
    """
    a = stored / t
    top = p_top.clamp_min(1e-30) ** a * (p_top > 0)
    p_min = p_top.masked_fill(p_top <= 0, 1.0).amin(-1, keepdim=True)
    rest = p_rest * p_min ** (a - 1.0)
    z = top.sum(-1, keepdim=True) + rest
    return top / z, rest / z


# --- buckets ------------------------------------------------------------------------------------


@dataclass
class Buckets:
    """p (target) and q (draft) over the same outcomes ``[B, T, N]``, float32.

    ``p``/``q`` are probabilities; ``log_p``/``log_q`` their logs clamped at `LOG_FLOOR`.
    """

    p: torch.Tensor
    log_p: torch.Tensor
    q: torch.Tensor
    log_q: torch.Tensor


def coarsen(draft_logits: torch.Tensor, target: Any, temperature: float = 1.0) -> Buckets:
    """p and q on the full vocabulary (target logits) or on top-k + rest (stored top-k)."""
    import torch

    signal = as_target_signal(target)
    if not signal.has_distribution:
        raise DspecError(
            "this loss needs the target's distribution, but the target signal has only labels",
            "give target logits or stored top-k probabilities, or use the 'ce' loss",
        )
    _check_temperature(signal, temperature)
    t = serving_temperature(temperature)
    log_q_full = torch.log_softmax(draft_logits.float() / t, dim=-1)
    vocab = draft_logits.shape[-1]

    if signal.logits is not None:
        _check_shape(signal.logits, draft_logits.shape, "target logits")
        log_p_raw = torch.log_softmax(signal.logits.float() / t, dim=-1)
        return Buckets(
            p=log_p_raw.exp(),
            log_p=log_p_raw.clamp_min(LOG_FLOOR),
            q=log_q_full.exp(),
            log_q=log_q_full.clamp_min(LOG_FLOOR),
        )

    ids, probs = signal.topk_ids, signal.topk_probs
    aligned = ids.shape == probs.shape and ids.shape[:-1] == draft_logits.shape[:-1]
    if ids.is_floating_point() or not aligned:
        raise DspecError(
            f"top-k signal of shapes ids {tuple(ids.shape)} ({ids.dtype}), probs "
            f"{tuple(probs.shape)} does not fit draft logits {tuple(draft_logits.shape)}",
            "store integer topk_ids and topk_probs as [B, T, K] aligned with the draft's positions",
        )
    ids = ids.to(device=draft_logits.device, dtype=torch.long)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise DspecError(
            f"top-k ids outside the draft's vocabulary of {vocab}",
            "use a draft with the target's tokenizer and vocabulary size",
        )
    p_top = probs.to(draft_logits.device).float().clamp_min(0.0)
    p_rest = (1.0 - p_top.sum(-1, keepdim=True)).clamp_min(0.0)
    p_rest = torch.where(p_rest < REST_SNAP, torch.zeros_like(p_rest), p_rest)
    if signal.temperature is not None and serving_temperature(signal.temperature) != t:
        p_top, p_rest = _retemper(p_top, p_rest, serving_temperature(signal.temperature), t)
    p = torch.cat([p_top, p_rest], dim=-1)

    log_q_top = log_q_full.gather(-1, ids)
    # The rest bucket's log mass, summed over the entries that are not top-k ids.
    log_q_rest = log_q_full.scatter(-1, ids, _MASKED_LOGIT).logsumexp(-1, keepdim=True)
    log_q_raw = torch.cat([log_q_top, log_q_rest], dim=-1)
    return Buckets(
        p=p,
        log_p=p.clamp_min(1e-30).log(),
        q=log_q_raw.exp(),
        log_q=log_q_raw.clamp_min(LOG_FLOOR),
    )


def _check_shape(tensor: torch.Tensor, expected: torch.Size, what: str) -> None:
    if tensor.shape != expected:
        raise DspecError(
            f"{what} of shape {tuple(tensor.shape)} do not match draft logits {tuple(expected)}",
            "align target and draft positions and use a draft with the target's vocabulary",
        )


# --- per-token divergences ----------------------------------------------------------------------


def _kl(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p||q) per token; entries with p = 0 contribute 0."""
    import torch

    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def tvd_per_token(b: Buckets) -> torch.Tensor:
    return 0.5 * (b.p - b.q).abs().sum(-1)


def fkl_per_token(b: Buckets) -> torch.Tensor:
    return _kl(b.p, b.log_p, b.log_q)


def rkl_per_token(b: Buckets) -> torch.Tensor:
    return _kl(b.q, b.log_q, b.log_p)


def jsd_per_token(b: Buckets, beta: float) -> torch.Tensor:
    """beta KL(p||m) + (1 - beta) KL(q||m), m = beta p + (1 - beta) q."""
    import torch

    log_m = torch.logaddexp(b.log_p + math.log(beta), b.log_q + math.log1p(-beta))
    return beta * _kl(b.p, b.log_p, log_m) + (1.0 - beta) * _kl(b.q, b.log_q, log_m)


def hard_labels(target: Any) -> torch.Tensor:
    """Label ids ``[B, T]``: given labels, else the target's argmax, else the stored top-1 id."""
    signal = as_target_signal(target)
    if signal.labels is not None:
        return signal.labels
    if signal.logits is not None:
        return signal.logits.argmax(-1)
    top = signal.topk_probs.argmax(-1, keepdim=True)
    return signal.topk_ids.gather(-1, top.to(signal.topk_ids.device)).squeeze(-1)


def ce_per_token(
    draft_logits: torch.Tensor, target: Any, temperature: float = 1.0
) -> torch.Tensor:
    """-log q(label) per token (q at the serving temperature); 0 where the label is negative."""
    import torch

    labels = hard_labels(target).to(device=draft_logits.device, dtype=torch.long)
    _check_shape(labels, draft_logits.shape[:-1], "labels")
    log_q = torch.log_softmax(draft_logits.float() / serving_temperature(temperature), dim=-1)
    valid = labels >= 0
    if valid.any() and int(labels.max()) >= draft_logits.shape[-1]:
        raise DspecError(
            f"label ids outside the draft's vocabulary of {draft_logits.shape[-1]}",
            "use a draft with the target's tokenizer and vocabulary size",
        )
    picked = log_q.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, -picked.clamp_min(LOG_FLOOR), torch.zeros_like(picked))


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` [B, T] over true ``mask`` entries; 0 (with a graph) when none is true."""
    import torch

    if mask is None:
        return values.mean()
    _check_shape(mask, values.shape, "loss mask")
    keep = mask.to(values.device).bool()
    total = torch.where(keep, values, torch.zeros_like(values)).sum()
    return total / keep.sum().clamp_min(1)


# --- specs and mixtures -------------------------------------------------------------------------


@dataclass(frozen=True)
class LossTerm:
    name: str
    weight: float = 1.0
    beta: float | None = None  # jsd only

    def __str__(self) -> str:
        body = f"jsd:{self.beta:g}" if self.name == "jsd" else self.name
        return body if self.weight == 1.0 else f"{self.weight:g}*{body}"


_TERM = re.compile(r"^(?:(?P<weight>[^*]+)\*)?(?P<name>[a-z]+)(?::(?P<beta>.+))?$")


def parse_loss_spec(spec: str) -> list[LossTerm]:
    """``"tvd+0.5*fkl"`` -> [LossTerm('tvd', 1), LossTerm('fkl', 0.5)]; DspecError if malformed."""

    def bad(why: str) -> DspecError:
        return DspecError(f"invalid loss {spec!r}: {why}", f"use {VALID_FORMS}")

    if not isinstance(spec, str) or not spec.strip():
        raise bad("empty")
    terms = []
    for raw in spec.replace(" ", "").lower().split("+"):
        m = _TERM.match(raw)
        if not m:
            raise bad(f"cannot read term {raw!r}")
        name = m["name"]
        if name not in LOSS_NAMES:
            raise bad(f"unknown loss {name!r}")
        weight = 1.0
        if m["weight"] is not None:
            try:
                weight = float(m["weight"])
            except ValueError:
                raise bad(f"weight {m['weight']!r} is not a number") from None
            if not (math.isfinite(weight) and weight > 0):
                raise bad(f"weight {m['weight']!r} must be a finite number > 0")
        beta = None
        if name == "jsd":
            if m["beta"] is None:
                raise bad("jsd needs its weight beta, as jsd:0.5")
            try:
                beta = float(m["beta"])
            except ValueError:
                raise bad(f"jsd beta {m['beta']!r} is not a number") from None
            if not 0.0 < beta < 1.0:
                raise bad(f"jsd beta {m['beta']!r} must be strictly between 0 and 1")
        elif m["beta"] is not None:
            raise bad(f"{name!r} takes no ':' parameter")
        terms.append(LossTerm(name, weight, beta))
    return terms


@dataclass
class DistillLoss:
    """A parsed loss spec at a serving temperature: ``loss(draft_logits, target, mask)``."""

    terms: list[LossTerm]
    temperature: float = 1.0

    @property
    def spec(self) -> str:
        return "+".join(str(t) for t in self.terms)

    @property
    def needs_distribution(self) -> bool:
        """False when only hard labels are needed (``ce``): no logits or top-k required."""
        return any(t.name != "ce" for t in self.terms)

    def parts(
        self, draft_logits: torch.Tensor, target: Any, mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Each term's unweighted masked mean, keyed by its spec (``"jsd:0.5"``, ``"tvd"``)."""
        signal = as_target_signal(target)
        buckets = None
        if self.needs_distribution:  # one coarsening shared by every term
            buckets = coarsen(draft_logits, signal, self.temperature)
        out: dict[str, torch.Tensor] = {}
        for term in self.terms:
            key = str(LossTerm(term.name, 1.0, term.beta))
            if key in out:
                continue
            if term.name == "ce":
                per_token = ce_per_token(draft_logits, signal, self.temperature)
                if signal.labels is not None:  # ignored labels are excluded from the mean too
                    keep = signal.labels.to(draft_logits.device) >= 0
                    ce_mask = keep if mask is None else mask.to(draft_logits.device).bool() & keep
                    out[key] = masked_mean(per_token, ce_mask)
                    continue
            elif term.name == "tvd":
                per_token = tvd_per_token(buckets)
            elif term.name == "fkl":
                per_token = fkl_per_token(buckets)
            elif term.name == "rkl":
                per_token = rkl_per_token(buckets)
            else:
                per_token = jsd_per_token(buckets, term.beta)
            out[key] = masked_mean(per_token, mask)
        return out

    def __call__(
        self, draft_logits: torch.Tensor, target: Any, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        parts = self.parts(draft_logits, target, mask)
        total = None
        for term in self.terms:
            value = term.weight * parts[str(LossTerm(term.name, 1.0, term.beta))]
            total = value if total is None else total + value
        return total


def make_loss(spec: str, temperature: float = 1.0) -> Callable[..., torch.Tensor]:
    """The loss named by ``spec`` at serving ``temperature`` (0 = greedy: distributions at T = 1).

    Returns a `DistillLoss`: ``loss(draft_logits [B,T,V], target_signal, mask [B,T]) -> scalar``.
    """
    serving_temperature(temperature)  # validate now, not at the first step
    return DistillLoss(parse_loss_spec(spec), float(temperature))


# --- held-out acceptance ------------------------------------------------------------------------


def acceptance_from_tvd(
    draft_logits: torch.Tensor,
    target: Any,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Expected speculative-sampling acceptance, 1 - TVD(p, q), masked mean over tokens.

    A detached float32 scalar. With stored top-k it is computed on the coarsening, so it is an
    upper bound of the full-vocabulary acceptance (TVD there is a lower bound).
    """
    import torch

    with torch.no_grad():
        return masked_mean(1.0 - tvd_per_token(coarsen(draft_logits, target, temperature)), mask)


def greedy_agreement(
    draft_logits: torch.Tensor, target: Any, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Fraction of tokens whose draft argmax equals the target's (labels, argmax or top-1): the
    per-token acceptance of greedy (T = 0) speculative decoding, teacher-forced."""
    import torch

    with torch.no_grad():
        labels = hard_labels(target).to(draft_logits.device)
        same = (draft_logits.argmax(-1) == labels).float()
        return masked_mean(same, mask)
