"""The fused activations of the fast CPU expert path, each judged by transformers' own activation module applied after
the matmul (the unfused reference): forward and gradients in fp32 (tight) and bf16 (bf16's precision), the traceable
custom op, the activations left unfused (they still run, through the unfused segment path), and a SigLIP-MoE whose
MLPs use `gelu_pytorch_tanh` against transformers' `grouped_mm` experts (which apply act_fn unfused)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import SiglipVisionConfig, SiglipVisionModel
from transformers.activations import ACT2FN

from encoder.kernels.activations import GELU, GELU_TANH, QUICK_GELU, SILU, fused_activation
from encoder.kernels.ops import traceable_segment_mlp
from encoder.kernels.segment_mlp import SegmentMLP, segment_mlp
from encoder.moe import CLIPMoESparseMLP
from encoder.siglip import SiglipMoEVisionConfig, sparse_upcycle_siglip

aten = torch.ops.aten
E, D, H = 4, 16, 24
COUNTS = [5, 0, 7, 4]  # expert 1 gets no rows
FUSED = {"quick_gelu": QUICK_GELU, "gelu": GELU, "gelu_pytorch_tanh": GELU_TANH, "silu": SILU}
BF16_ERROR = 1e-2  # relative (norm) error allowed against fp64: a few of bf16's 2^-8 roundings


def tensors(dtype, seed=0):
    """Rows sorted by expert and stacked expert weights, all requiring grad."""
    g = torch.Generator().manual_seed(seed)
    shapes = ((sum(COUNTS), D), (E, H, D), (E, H), (E, D, H), (E, D))
    return [(torch.randn(s, generator=g) * 0.5).to(dtype).requires_grad_() for s in shapes]


def reference_mlp(x, up, up_bias, down, down_bias, counts, act_fn):
    """transformers' activation module applied to each expert's fc1 output, one expert at a time."""
    out, start = [], 0
    for e, n in enumerate(counts):
        h = act_fn(x[start : start + n] @ up[e].T + up_bias[e])
        out.append(h @ down[e].T + down_bias[e])
        start += n
    return torch.cat(out)


def forward_backward(fn, inputs, seed=3):
    y = fn(*inputs)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype)
    return y, torch.autograd.grad(y, inputs, grad)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("act", list(FUSED))
def test_fused_segment_mlp_equals_the_unfused_reference_in_fp32(act):
    act_fn = ACT2FN[act]
    assert fused_activation(act_fn) is FUSED[act]
    inputs = tensors(torch.float32)
    y, grads = forward_backward(lambda *t: segment_mlp(*t, COUNTS, act_fn), inputs)
    assert type(y.grad_fn).__name__ == SegmentMLP.__name__ + "Backward"  # really the fused node
    y_ref, grads_ref = forward_backward(lambda *t: reference_mlp(*t, COUNTS, act_fn), inputs)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for name, g, r in zip(("x", "up", "up_bias", "down", "down_bias"), grads, grads_ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5, msg=name)
    assert all(torch.count_nonzero(g[1]) == 0 for g in grads[1:])  # the expert without rows: exactly zero


@pytest.mark.parametrize("act", list(FUSED))
def test_fused_segment_mlp_in_bf16_is_as_accurate_as_the_unfused_reference(act):
    """bf16 results differ by a rounding here and there (values up to ~10, so one ulp is 0.06): both are judged
    against the fp64 reference on the same numbers, and the fused path must be as close to it as the unfused one."""
    act_fn = ACT2FN[act]
    exact_inputs = [t.detach().double().requires_grad_() for t in tensors(torch.bfloat16)]  # the same numbers
    exact_y, exact_grads = forward_backward(lambda *t: reference_mlp(*t, COUNTS, act_fn), exact_inputs)
    y, grads = forward_backward(lambda *t: segment_mlp(*t, COUNTS, act_fn), tensors(torch.bfloat16))
    y_ref, grads_ref = forward_backward(lambda *t: reference_mlp(*t, COUNTS, act_fn), tensors(torch.bfloat16))
    assert type(y.grad_fn).__name__ == SegmentMLP.__name__ + "Backward" and y.dtype == torch.bfloat16
    names = ("y", "x", "up", "up_bias", "down", "down_bias")
    for name, got, ref, exact in zip(names, (y, *grads), (y_ref, *grads_ref), (exact_y, *exact_grads)):
        err, ref_err = relative_error(got, exact), relative_error(ref, exact)
        assert err < BF16_ERROR and err <= 1.5 * ref_err + 1e-3, (name, err, ref_err)


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "gelu"])
def test_fused_gelus_are_exactly_transformers_kernels(act):
    # The fused forms call the same aten kernels as transformers' modules: equal bit for bit, forward and backward.
    act_fn, fused = ACT2FN[act], FUSED[act]
    z = (torch.randn(257) * 4).requires_grad_()
    expected = act_fn(z)
    (grad_expected,) = torch.autograd.grad(expected, z, torch.ones_like(z))
    assert torch.equal(fused.forward(z.detach(), torch.empty_like(z)), expected)
    grad = torch.ones_like(z)
    assert torch.equal(fused.backward(grad, z.detach(), grad), grad_expected)  # in place over its own input


def test_gelu_tanh_differs_from_exact_gelu():
    # Guards the tests above against a tanh kernel that is secretly the exact one (they differ by ~1e-4 here).
    z = torch.linspace(-3, 3, 101)
    assert not torch.allclose(GELU_TANH.forward(z, torch.empty_like(z)), GELU.forward(z, torch.empty_like(z)),
                              atol=1e-5, rtol=0)


def test_torch_gelu_modules_are_fused_by_their_approximation():
    assert fused_activation(torch.nn.GELU()) is GELU
    assert fused_activation(torch.nn.GELU(approximate="tanh")) is GELU_TANH


UNFUSED = {"gelu_python_tanh": ACT2FN["gelu_python_tanh"], "gelu_new": ACT2FN["gelu_new"],
           "gelu_python": ACT2FN["gelu_python"], "relu": torch.nn.ReLU()}


@pytest.mark.parametrize("act", list(UNFUSED))
def test_activations_without_a_fused_kernel_fall_back_and_still_agree(act):
    act_fn = UNFUSED[act]
    assert fused_activation(act_fn) is None
    inputs = tensors(torch.float32)
    y, grads = forward_backward(lambda *t: segment_mlp(*t, COUNTS, act_fn), inputs)
    assert type(y.grad_fn).__name__ != SegmentMLP.__name__ + "Backward"
    y_ref, grads_ref = forward_backward(lambda *t: reference_mlp(*t, COUNTS, act_fn), inputs)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "gelu_python_tanh"])
def test_traceable_op_matches_the_eager_kernels(act):
    act_fn = ACT2FN[act]
    ends = torch.tensor(COUNTS).cumsum(0)
    inputs = tensors(torch.float32)
    y, grads = forward_backward(lambda *t: traceable_segment_mlp(*t, ends, act_fn), inputs)
    y_eager, grads_eager = forward_backward(lambda *t: segment_mlp(*t, COUNTS, act_fn), inputs)
    torch.testing.assert_close(y, y_eager)
    for g, r in zip(grads, grads_eager):
        torch.testing.assert_close(g, r)


def test_gelu_tanh_custom_op_passes_opcheck():
    ends = torch.tensor(COUNTS).cumsum(0)
    torch.library.opcheck(torch.ops.clip_moe.segment_mlp.default, (*tensors(torch.float32), ends, "gelu_tanh", True))


class OverloadLog(TorchDispatchMode):
    """The aten overloads that run (gelu.out is the fused kernel writing into its buffer; gelu.default is act_fn)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def siglip_moe_layer(seed=0) -> CLIPMoESparseMLP:
    cfg = SiglipMoEVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                num_experts=4, top_k=2, moe_layers=[0])
    assert cfg.hidden_act == "gelu_pytorch_tanh"  # SigLIP's own default
    torch.manual_seed(seed)
    layer = CLIPMoESparseMLP(cfg)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer


def token_by_token(layer: CLIPMoESparseMLP, x: torch.Tensor) -> torch.Tensor:
    """Softmax top-k routing and transformers' GELUTanh after each expert's fc1, one token at a time."""
    flat, ex, act_fn = x.reshape(-1, x.shape[-1]), layer.experts, ACT2FN["gelu_pytorch_tanh"]
    out = []
    for t in range(flat.shape[0]):
        w, idx = torch.topk(torch.softmax(layer.router(flat[t]).float(), -1), layer.top_k)
        w = w / w.sum()
        out.append(sum(wi * (act_fn(flat[t] @ ex.up_proj[e].T + ex.up_proj_bias[e]) @ ex.down_proj[e].T
                             + ex.down_proj_bias[e]) for wi, e in zip(w, idx.tolist())))
    return torch.stack(out).view_as(x)


def test_siglip_moe_layer_fast_path_equals_the_reference_forward_and_backward():
    layer = siglip_moe_layer()
    x = torch.randn(2, 9, 32, requires_grad=True)
    with OverloadLog() as log:
        y = layer(x)[0]
        y.square().sum().backward()
    assert aten.gelu.out in log.ops and aten.gelu.default not in log.ops  # the fused kernel, not act_fn
    fast = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    y_ref = token_by_token(layer, x)
    y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(fast, [x.grad] + [p.grad for p in layer.parameters()]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_siglip_moe_tower_fast_path_equals_transformers_grouped_mm_experts():
    """A whole SigLIP-MoE vision tower (every layer MoE): our fused default against transformers' `grouped_mm`
    experts implementation, which applies the module's act_fn (GELUTanh) after its matmul."""
    torch.manual_seed(0)
    dense = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=2, image_size=32, patch_size=8)).eval()
    model = sparse_upcycle_siglip(dense, vision_moe=dict(num_experts=4, top_k=2, moe_layers=[0, 1]))
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "up_proj"):
                module.up_proj.add_(0.3 * torch.randn_like(module.up_proj))
    pixels = torch.randn(2, 3, 32, 32)

    def step():
        model.zero_grad()
        out = model(pixels)
        (out.last_hidden_state.square().sum() + out.pooler_output.sum()).backward()
        return out.pooler_output.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.set_experts_implementation("eager")
    with OverloadLog() as log:
        ours, grads = step()
    assert aten.gelu.out in log.ops
    model.set_experts_implementation("grouped_mm")
    theirs, grads_ref = step()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert grads.keys() == grads_ref.keys() and any(".experts." in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-4, rtol=1e-4, msg=name)
