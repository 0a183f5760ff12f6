"""Distillation losses (train/losses.py): values, limits, top-k coarsening, gradients, specs."""

from __future__ import annotations

import math

import pytest
import torch

from deepspec_plugin.errors import DspecError
from deepspec_plugin.train.losses import (
    TargetSignal,
    acceptance_from_tvd,
    coarsen,
    greedy_agreement,
    make_loss,
    parse_loss_spec,
)

P = [0.5, 0.3, 0.2]
Q = [0.2, 0.5, 0.3]
SPECS = ["ce", "fkl", "rkl", "jsd:0.5", "jsd:0.1", "tvd"]


def logits_of(probs):
    """Logits [1, 1, V] whose softmax is ``probs`` (log of the probabilities)."""
    return torch.tensor(probs, dtype=torch.float64).log().float().view(1, 1, -1)


def kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def topk_of(logits, k, temperature=1.0):
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    top = probs.topk(k, dim=-1)
    return TargetSignal(topk_ids=top.indices, topk_probs=top.values)


def test_known_values_on_three_tokens():
    q_logits, p_logits = logits_of(Q), logits_of(P)
    expected = {
        "tvd": 0.5 * sum(abs(a - b) for a, b in zip(P, Q)),
        "fkl": kl(P, Q),
        "rkl": kl(Q, P),
        "ce": -math.log(Q[0]),  # target argmax is token 0
    }
    m = [0.5 * a + 0.5 * b for a, b in zip(P, Q)]
    expected["jsd:0.5"] = 0.5 * kl(P, m) + 0.5 * kl(Q, m)
    for spec, value in expected.items():
        got = make_loss(spec)(q_logits, p_logits, None).item()
        assert got == pytest.approx(value, rel=1e-5), spec
    assert expected["tvd"] == pytest.approx(0.3)
    assert expected["tvd"] == pytest.approx(1 - sum(min(a, b) for a, b in zip(P, Q)))


def test_zero_when_equal_and_positive_otherwise():
    torch.manual_seed(0)
    p_logits = torch.randn(2, 5, 11) * 2
    q_logits = torch.randn(2, 5, 11) * 2
    for spec in SPECS[1:]:
        same = make_loss(spec, temperature=0.7)(p_logits.clone(), p_logits, None).item()
        assert abs(same) < 1e-6, spec
        assert make_loss(spec, temperature=0.7)(q_logits, p_logits, None).item() > 1e-3, spec
    # ce is the entropy-free hard-label loss: it is minimal (not 0) at q == p, and 0 at one-hot q.
    one_hot = torch.nn.functional.one_hot(p_logits.argmax(-1), 11).float() * 100
    assert make_loss("ce")(one_hot, p_logits, None).item() < 1e-6


def test_tvd_equals_one_minus_overlap_and_half_l1():
    torch.manual_seed(1)
    p_logits, q_logits = torch.randn(3, 4, 17), torch.randn(3, 4, 17)
    p, q = torch.softmax(p_logits, -1), torch.softmax(q_logits, -1)
    tvd = make_loss("tvd")(q_logits, p_logits, None)
    assert tvd.item() == pytest.approx((1 - torch.minimum(p, q).sum(-1)).mean().item(), abs=1e-6)
    assert tvd.item() == pytest.approx((0.5 * (p - q).abs().sum(-1)).mean().item(), abs=1e-6)
    acc = acceptance_from_tvd(q_logits, p_logits)
    assert acc.item() == pytest.approx(1 - tvd.item(), abs=1e-6) and not acc.requires_grad


def test_jsd_limits():
    q_logits, p_logits = logits_of(Q), logits_of(P)
    # beta -> 0: jsd / beta -> KL(p||q); beta -> 1: jsd / (1 - beta) -> KL(q||p); both -> 0.
    small = make_loss("jsd:0.0001")(q_logits, p_logits, None).item()
    large = make_loss("jsd:0.9999")(q_logits, p_logits, None).item()
    assert small / 1e-4 == pytest.approx(kl(P, Q), rel=1e-2)
    assert large / 1e-4 == pytest.approx(kl(Q, P), rel=1e-2)
    assert small < 1e-3 and large < 1e-3
    # Symmetric at 0.5 when p and q swap.
    a = make_loss("jsd:0.5")(q_logits, p_logits, None).item()
    b = make_loss("jsd:0.5")(p_logits, q_logits, None).item()
    assert a == pytest.approx(b, rel=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
def test_topk_with_k_equal_v_matches_full_logits(temperature):
    torch.manual_seed(2)
    p_logits, q_logits = torch.randn(2, 6, 13) * 3, torch.randn(2, 6, 13) * 3
    t_dist = 1.0 if temperature == 0 else temperature
    signal = topk_of(p_logits, 13, t_dist)
    mask = torch.rand(2, 6) > 0.3
    for spec in SPECS:
        loss = make_loss(spec, temperature=temperature)
        full = loss(q_logits, p_logits, mask).item()
        coarse = loss(q_logits, signal, mask).item()
        assert coarse == pytest.approx(full, rel=1e-5, abs=1e-6), spec


def test_stored_topk_sharpened_to_a_lower_serving_temperature():
    """Data stored at T = 1, a loss at T = 0.7: the top-k are re-tempered. With k = V exactly the
    full-logit loss; with k < V the rest bucket uses an upper bound, and the held-out acceptance
    stays within a hair of the full-vocabulary one at that coarsening."""
    torch.manual_seed(4)
    p_logits, q_logits = torch.randn(2, 6, 40) * 3, torch.randn(2, 6, 40) * 3
    for spec in SPECS:
        loss = make_loss(spec, temperature=0.7)
        full = loss(q_logits, p_logits, None).item()
        stored = topk_of(p_logits, 40, 1.0)
        stored.temperature = 1.0
        assert loss(q_logits, stored, None).item() == pytest.approx(full, rel=1e-4, abs=1e-6)
    # k < V on a peaked target (as a language model's are): the rest bucket is an upper bound.
    p_logits = torch.randn(2, 6, 40) * 6
    top8 = topk_of(p_logits, 8, 1.0)
    top8.temperature = 1.0
    truth = coarsen(q_logits, topk_of(p_logits, 8, 0.7), 0.7).p  # data stored at 0.7
    sharpened = coarsen(q_logits, top8, 0.7).p
    assert (sharpened[..., -1] >= truth[..., -1] - 1e-6).all()
    assert (sharpened - truth).abs().max().item() < 0.02
    assert acceptance_from_tvd(q_logits, top8, None, 0.7).item() == pytest.approx(
        acceptance_from_tvd(q_logits, topk_of(p_logits, 8, 0.7), None, 0.7).item(), abs=0.01)


def test_topk_coarsening_lower_bounds_full_divergences():
    torch.manual_seed(3)
    p_logits, q_logits = torch.randn(4, 8, 50) * 2, torch.randn(4, 8, 50) * 2
    # k < 49 keeps the leftover mass well above REST_SNAP (below it, it is taken as rounding).
    for k in (1, 4, 16, 40):
        signal = topk_of(p_logits, k)
        b = coarsen(q_logits, signal)
        assert b.p.shape[-1] == k + 1
        assert torch.allclose(b.p.sum(-1), torch.ones(4, 8), atol=1e-5)
        assert torch.allclose(b.q.sum(-1), torch.ones(4, 8), atol=1e-5)
        for spec in ("tvd", "fkl", "rkl", "jsd:0.5"):
            loss = make_loss(spec)
            # Per token, not just on average: merging outcomes never increases a divergence.
            for i in range(4):
                coarse = loss(q_logits[i : i + 1], topk_of(p_logits[i : i + 1], k), None).item()
                full = loss(q_logits[i : i + 1], p_logits[i : i + 1], None).item()
                assert coarse <= full + 1e-6, (spec, k)
    tvd = make_loss("tvd")
    coarse_tvd = tvd(q_logits, topk_of(p_logits, 49), None).item()
    assert coarse_tvd <= tvd(q_logits, p_logits, None).item() + 1e-6
    # The rest bucket carries the leftover mass.
    signal = topk_of(p_logits, 4)
    b = coarsen(q_logits, signal)
    assert torch.allclose(b.p[..., -1], 1 - signal.topk_probs.sum(-1), atol=1e-6)


def test_topk_ce_uses_top1_and_labels_override():
    torch.manual_seed(4)
    p_logits, q_logits = torch.randn(2, 3, 9), torch.randn(2, 3, 9)
    signal = topk_of(p_logits, 3)
    # Shuffle the stored order: ce must still pick the most probable id, not position 0.
    perm = torch.tensor([2, 0, 1])
    shuffled = TargetSignal(
        topk_ids=signal.topk_ids[..., perm], topk_probs=signal.topk_probs[..., perm]
    )
    ce = make_loss("ce")
    assert ce(q_logits, shuffled, None).item() == pytest.approx(ce(q_logits, p_logits, None).item())
    labels = torch.randint(0, 9, (2, 3))
    expected = -torch.log_softmax(q_logits, -1).gather(-1, labels[..., None]).mean()
    assert ce(q_logits, labels, None).item() == pytest.approx(expected.item(), rel=1e-6)
    # Negative labels are ignored.
    labels[0, 0] = -100
    kept = torch.ones(2, 3, dtype=torch.bool)
    kept[0, 0] = False
    nll = -torch.log_softmax(q_logits, -1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    assert ce(q_logits, labels, None).item() == pytest.approx(nll[kept].mean().item(), rel=1e-6)
    assert greedy_agreement(p_logits, shuffled).item() == 1.0


def test_gradients_flow_and_stay_finite_with_zero_probabilities():
    torch.manual_seed(5)
    q_logits = torch.randn(2, 4, 7)
    q_logits[0, 0, 3] = -float("inf")  # draft gives a token zero probability
    q_logits[1, 2, :] = torch.tensor([50.0, -1e4, -1e4, 0, 0, 0, 0])
    p_logits = torch.randn(2, 4, 7)
    p_logits[0, 0, :3] = -float("inf")  # target gives tokens zero probability
    p_logits[1, 2, 1] = -float("inf")
    probs = torch.softmax(p_logits, -1).topk(3, -1)
    zero_top = probs.values.clone()
    zero_top[0, 1, 2] = 0.0  # a stored top-k probability of exactly zero
    signals = [p_logits, TargetSignal(topk_ids=probs.indices, topk_probs=zero_top),
               TargetSignal(topk_ids=torch.arange(7).expand(2, 4, 7),
                            topk_probs=torch.softmax(p_logits, -1))]
    for target in signals:
        for spec in SPECS + ["tvd+0.5*fkl+0.1*rkl"]:
            x = q_logits.clone().to(torch.bfloat16).float().requires_grad_(True)
            x.data[0, 0, 3] = -float("inf")
            value = make_loss(spec, temperature=0.8)(x, target, None)
            assert torch.isfinite(value), spec
            value.backward()
            assert torch.isfinite(x.grad).all(), spec
            assert x.grad.abs().sum() > 0, spec


def test_bf16_logits_computed_in_float32():
    torch.manual_seed(6)
    p_logits, q_logits = torch.randn(2, 3, 10), torch.randn(2, 3, 10)
    for spec in ("tvd", "fkl", "jsd:0.5"):
        low = make_loss(spec)(q_logits.bfloat16(), p_logits.bfloat16(), None)
        ref = make_loss(spec)(q_logits.bfloat16().float(), p_logits.bfloat16().float(), None)
        assert low.dtype == torch.float32 and low.item() == pytest.approx(ref.item(), rel=1e-6)


def test_mask_excludes_tokens():
    torch.manual_seed(7)
    p_logits, q_logits = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 1:3] = True
    mask[1, 4] = True
    garbage = q_logits.clone()
    garbage[~mask] = float("nan")  # masked positions may hold anything finite or not
    for spec in SPECS:
        loss = make_loss(spec)
        masked = loss(q_logits, p_logits, mask).item()
        selected = loss(q_logits[mask][None], p_logits[mask][None], None).item()
        assert masked == pytest.approx(selected, rel=1e-6), spec
        assert math.isfinite(loss(garbage, p_logits, mask).item()), spec
    empty = make_loss("tvd")(q_logits, p_logits, torch.zeros(2, 5, dtype=torch.bool))
    assert empty.item() == 0.0
    with pytest.raises(DspecError, match="loss mask"):
        make_loss("tvd")(q_logits, p_logits, torch.ones(2, 4, dtype=torch.bool))


def test_mixtures_parse_and_add():
    torch.manual_seed(8)
    p_logits, q_logits = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    parts = {s: make_loss(s)(q_logits, p_logits, None).item() for s in ("tvd", "fkl", "jsd:0.3")}
    mix = make_loss(" TVD + 0.5*fkl + 2*jsd:0.3 ")
    assert mix.spec == "tvd+0.5*fkl+2*jsd:0.3"
    expected = parts["tvd"] + 0.5 * parts["fkl"] + 2 * parts["jsd:0.3"]
    assert mix(q_logits, p_logits, None).item() == pytest.approx(expected, rel=1e-6)
    assert set(mix.parts(q_logits, p_logits)) == {"tvd", "fkl", "jsd:0.3"}
    assert [t.name for t in parse_loss_spec("1e-3*ce+rkl")] == ["ce", "rkl"]
    assert not make_loss("ce").needs_distribution and make_loss("ce+tvd").needs_distribution


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("", "empty"),
        ("kl", "unknown loss 'kl'"),
        ("tvd+", "cannot read"),
        ("0*tvd", "must be a finite number > 0"),
        ("-1*fkl", "must be a finite number > 0"),
        ("inf*fkl", "must be a finite number > 0"),
        ("x*fkl", "not a number"),
        ("jsd", "needs its weight beta"),
        ("jsd:1", "strictly between 0 and 1"),
        ("jsd:0", "strictly between 0 and 1"),
        ("jsd:abc", "not a number"),
        ("tvd:0.5", "takes no ':'"),
    ],
)
def test_bad_specs_raise(spec, fragment):
    with pytest.raises(DspecError, match=fragment) as err:
        make_loss(spec)
    assert repr(spec) in str(err.value) and "jsd:BETA" in str(err.value)


def test_bad_inputs_raise():
    q_logits = torch.randn(1, 2, 5)
    with pytest.raises(DspecError, match="temperature"):
        make_loss("tvd", temperature=-1)
    with pytest.raises(DspecError, match="do not match"):
        make_loss("fkl")(q_logits, torch.randn(1, 2, 6), None)
    with pytest.raises(DspecError, match="outside the draft's vocabulary"):
        make_loss("tvd")(q_logits, TargetSignal(topk_ids=torch.full((1, 2, 1), 5),
                                                topk_probs=torch.ones(1, 2, 1)), None)
    with pytest.raises(DspecError, match="only labels"):
        make_loss("tvd")(q_logits, torch.zeros(1, 2, dtype=torch.long), None)
    stored = TargetSignal(topk_ids=torch.zeros(1, 2, 1, dtype=torch.long),
                          topk_probs=torch.ones(1, 2, 1), temperature=0.7)
    with pytest.raises(DspecError, match="temperature 0.7"):
        make_loss("tvd", temperature=1.0)(q_logits, stored, None)
    assert math.isfinite(make_loss("tvd", temperature=0.7)(q_logits, stored, None).item())


def test_adam_on_free_logits_minimises_tvd():
    torch.manual_seed(9)
    p_logits = torch.randn(4, 8, 32) * 2
    x = torch.zeros(4, 8, 32, requires_grad=True)
    loss = make_loss("tvd")
    opt = torch.optim.Adam([x], lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        value = loss(x, p_logits, None)
        value.backward()
        opt.step()
    assert loss(x, p_logits, None).item() < 0.01
    assert acceptance_from_tvd(x, p_logits).item() > 0.99
