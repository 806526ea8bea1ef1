"""The segment kernels on their own: against a per-expert reference loop (forward and gradients, empty
experts included), the fused activations against transformers' modules, and the custom ops' registration
(fake kernels, autograd) checked by torch.library.opcheck."""

import pytest
import torch
from transformers.activations import ACT2FN

from encoder.kernels.activations import QUICK_GELU, fused_activation
from encoder.kernels.ops import traceable_segment_mlp
from encoder.kernels.segment_mlp import segment_counts, segment_linear, segment_mlp

E, D, H = 4, 8, 12


def weights(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((E, H, D), (E, H), (E, D, H), (E, D))
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def rows(counts, dtype=torch.float64, seed=1):
    x = torch.randn(sum(counts), D, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return x.requires_grad_()


def reference_mlp(x, up, up_bias, down, down_bias, counts, act_fn):
    """One expert at a time with plain ops: what the kernels must compute."""
    out, start = [], 0
    for e, n in enumerate(counts):
        h = act_fn(x[start : start + n] @ up[e].T + up_bias[e])
        out.append(h @ down[e].T + down_bias[e])
        start += n
    return torch.cat(out)


COUNTS = {"every expert": [3, 2, 4, 1], "experts 1 and 3 empty": [5, 0, 3, 0], "one expert": [0, 0, 6, 0]}
ACTS = ["quick_gelu", "gelu", "silu", "gelu_pytorch_tanh", "gelu_new"]  # the last has no fused kernel


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("case", list(COUNTS))
def test_segment_mlp_matches_the_reference_forward_and_backward(case, act):
    counts, act_fn = COUNTS[case], ACT2FN[act]
    x, w = rows(counts), weights()
    y = segment_mlp(x, *w, counts, act_fn)
    grad = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad(y, [x, *w], grad)
    y_ref = reference_mlp(x, *w, counts, act_fn)
    expected = torch.autograd.grad(y_ref, [x, *w], grad)
    torch.testing.assert_close(y, y_ref)
    for name, g, r in zip(("x", "up", "up_bias", "down", "down_bias"), got, expected):
        torch.testing.assert_close(g, r, msg=name)
    for e in (e for e, n in enumerate(counts) if n == 0):  # empty experts: exactly zero, not stale memory
        assert all(torch.count_nonzero(g[e]) == 0 for g in got[1:])


def test_segment_mlp_passes_gradcheck():
    counts = [2, 0, 3, 1]
    x, w = rows(counts), weights()
    assert torch.autograd.gradcheck(lambda *t: segment_mlp(*t, counts, ACT2FN["quick_gelu"]), (x, *w))
    assert torch.autograd.gradcheck(lambda x, wt, b: segment_linear(x, wt, b, counts), (x, w[0], w[1]))


def test_no_grad_forward_records_nothing():
    counts = [2, 1, 0, 3]
    x, w = rows(counts), weights()
    with torch.no_grad():
        y = segment_mlp(x, *w, counts, ACT2FN["quick_gelu"])
    assert y.grad_fn is None and not y.requires_grad


@pytest.mark.parametrize("act", ["quick_gelu", "gelu", "silu", "gelu_pytorch_tanh"])
def test_fused_activations_compute_the_transformers_activation(act):
    act_fn = ACT2FN[act]
    fused = fused_activation(act_fn)
    assert fused is not None
    z = torch.randn(64, dtype=torch.float64) * 3
    out = fused.forward(z * fused.pre_scale, torch.empty_like(z)) * fused.post_scale
    torch.testing.assert_close(out, act_fn(z))
    assert fused_activation(ACT2FN["quick_gelu"]) is QUICK_GELU


def test_unknown_activations_are_not_fused():
    assert fused_activation(ACT2FN["gelu_new"]) is None
    assert fused_activation(torch.nn.ReLU()) is None


def test_segment_counts_read_the_ends():
    assert segment_counts(torch.tensor([3, 3, 7, 7])) == [3, 0, 4, 0]


@pytest.mark.parametrize("act", ["quick_gelu", "gelu_pytorch_tanh", "gelu_new"])
def test_traceable_segment_mlp_matches_the_eager_kernels(act):
    counts = [3, 0, 4, 2]
    ends = torch.tensor(counts).cumsum(0)
    x, w = rows(counts), weights()
    y = traceable_segment_mlp(x, *w, ends, ACT2FN[act])
    y_eager = segment_mlp(x, *w, counts, ACT2FN[act])
    torch.testing.assert_close(y, y_eager)
    got = torch.autograd.grad(y.sum(), [x, *w])
    expected = torch.autograd.grad(y_eager.sum(), [x, *w])
    for g, r in zip(got, expected):
        torch.testing.assert_close(g, r)


def test_custom_ops_pass_opcheck():
    # Schema, fake (meta) kernels and the autograd registration, as torch.compile / torch.export rely on them.
    counts = [3, 0, 4, 2]
    ends = torch.tensor(counts).cumsum(0)
    x, (up, up_bias, down, down_bias) = rows(counts, torch.float32), weights(torch.float32)
    op = torch.ops.clip_moe.segment_mlp.default
    torch.library.opcheck(op, (x, up, up_bias, down, down_bias, ends, "quick_gelu", True))
    # keep_pre_activation=False is the inference form (no graph recorded, so no backward to check).
    inference = [t.detach() for t in (x, up, up_bias, down, down_bias)]
    torch.library.opcheck(op, (*inference, ends, "quick_gelu", False))
    torch.library.opcheck(torch.ops.clip_moe.segment_linear.default, (x, up, up_bias, ends))
