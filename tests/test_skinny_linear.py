"""SkinnyLinear computes what nn.Linear computes, and the reference engine uses it for every model.

Results are compared with ``F.linear`` at a float32 tolerance (another BLAS kernel sums in another
order); the engine-level checks (greedy speculation equal to plain decoding, the chi-square tests)
run with skinny linears on in ``test_reference_engine.py`` and the EAGLE-3 / head-draft tests.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepspec_plugin.bench.engines.reference import ReferenceEngine
from deepspec_plugin.bench.engines.skinny_linear import (
    MAX_ROWS,
    SkinnyLinear,
    use_skinny_linears,
    uses_skinny_linears,
)


def _layer(bias: bool, dtype=torch.float32) -> SkinnyLinear:
    torch.manual_seed(0)
    layer = nn.Linear(96, 160, bias=bias).to(dtype)
    assert use_skinny_linears(layer) == 1
    return layer


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, MAX_ROWS, MAX_ROWS + 1, 12])
def test_equals_f_linear(rows, bias):
    layer = _layer(bias)
    x = torch.randn(rows, 96)
    out = layer(x)
    assert out.shape == (rows, 160)
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1, 96), (2, 3, 96), (1, 4, 96), (3, 96)])
def test_keeps_leading_dimensions(shape):
    layer = _layer(True)
    x = torch.randn(*shape)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias),
                               rtol=1e-5, atol=1e-5)


def test_non_contiguous_input():
    layer = _layer(False)
    x = torch.randn(96, 4).t()  # a transposed view: 4 rows, not contiguous
    assert not x.is_contiguous()
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)


def test_bf16_and_empty_inputs_take_f_linear():
    layer = _layer(True, torch.bfloat16)
    x = torch.randn(2, 96, dtype=torch.bfloat16)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))  # the same kernel
    empty = _layer(True)(torch.randn(0, 96))
    assert empty.shape == (0, 160)


def test_gradients_flow():
    layer = _layer(True)
    x = torch.randn(3, 96, requires_grad=True)
    layer(x).sum().backward()
    ref = nn.Linear(96, 160)
    ref.load_state_dict(layer.state_dict())
    x2 = x.detach().clone().requires_grad_()
    ref(x2).sum().backward()
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)


class _LoraLike(nn.Linear):
    """A subclass with its own forward: must be left alone."""


def test_swap_in_place_and_back():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2), _LoraLike(2, 2))
    keys = list(model.state_dict())
    params = [p.data_ptr() for p in model.parameters()]
    assert use_skinny_linears(model) == 2
    assert type(model[0]) is SkinnyLinear and type(model[3]) is _LoraLike
    assert uses_skinny_linears(model)
    assert list(model.state_dict()) == keys
    assert [p.data_ptr() for p in model.parameters()] == params  # same tensors, nothing copied
    assert use_skinny_linears(model, on=False) == 0
    assert type(model[0]) is nn.Linear and not uses_skinny_linears(model)
    assert use_skinny_linears(None) == 0


def test_reference_engine_switches_and_reports(tiny):
    from deepspec_plugin.bench.engines.base import GenerationConfig
    from deepspec_plugin.models import load_causal_lm

    target, draft = load_causal_lm(tiny.target), load_causal_lm(tiny.draft)
    cfg = GenerationConfig(max_new_tokens=24, k=3)
    torch_engine = ReferenceEngine(target, draft, skinny_linears=False)
    assert torch_engine.describe()["linears"] == "torch" and not uses_skinny_linears(target)
    slow = torch_engine.generate([[5, 17, 33, 80], [7, 8]], cfg)
    engine = ReferenceEngine(target, draft)
    assert engine.describe()["linears"] == "skinny"
    assert uses_skinny_linears(target) and uses_skinny_linears(draft)
    fast = engine.generate([[5, 17, 33, 80], [7, 8]], cfg)
    # Greedy: the same tokens and counts (a near-tie broken otherwise by rounding would show here).
    assert [g.token_ids for g in fast.generations] == [g.token_ids for g in slow.generations]
    assert fast.counts == slow.counts
