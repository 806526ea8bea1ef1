"""Side-by-side timings of a MoE FFN and vision tower against their dense counterparts (CPU or CUDA).

`--family clip` (the default): CLIP-MoE, QuickGELU MLPs, a CLS token. `--family siglip`: SigLIP-MoE
(SiglipMoEVisionModel: gelu_pytorch_tanh MLPs, every patch a token, the attention-pooling head's MLP dense), the
tower of LLaVA-OneVision / PaliGemma. Everything below reads "CLIP" for the family's own classes.

Everything runs in one process with interleaved rounds (warm-up, then every implementation once per
round in a rotating order, median over rounds), so the ratios are fair even when the machine is shared.

FFN (one layer, [batch, tokens, width] input, top-k of E experts, routing included):
  moe            our CLIPMoESparseMLP (experts' own forward, `experts_implementation="eager"`)
  dense_2h       transformers' CLIPMLP with hidden k*h: the same active FLOPs as the MoE
  masked_loop    per-expert torch.where on the top-k mask + gather + fc1/act/fc2 + index_add_
                 (the CLIP-MoE reference / transformers' eager Mixtral dispatch), same router and weights
  hf_grouped_mm  transformers' `grouped_mm` experts implementation on the same module and weights
  dense_2h_fused_act  the dense_2h FFN run through our experts code as 1 expert (same fused QuickGELU as
                 moe, no router): separates the activation's cost from the routing / dispatch overhead
  moe_NAME       moe forced to each registered experts implementation (encoder.EXPERT_DISPATCH: segments,
                 grouped_mm, ...) that this torch build can run
  (transformers' `batched_mm` is not run: it gathers a [T*k, h, d] weight copy per projection.)

Tower (CLIPMoEVisionModel, every layer MoE) vs the dense tower (moe_layers=[]) vs the ideal
  dense tower + (k-1) x (the dense tower's MLPs alone, on the same hidden-state shape).

`--device cuda --dtype bfloat16 --preset vit-l-336` is the GPU check (scripts/gpu_check.sh): ViT-L/14-336
shapes, weights and inputs in bf16, CUDA synchronised around every timed call; the tower also reports images/s.
`--preset siglip-so400m-384` is SigLIP SO400M/14-384 (LLaVA-OneVision's tower) whole; `--preset siglip-so400m-cpu`
keeps its width / heads / MLP (1152 / 16 / 4304) with 3 layers, 224px images (256 patches) and batch 2, which runs
in a few minutes on 2 CPU cores (docs/bench/moe_siglip_cpu.json).

Prints one JSON object on stdout; progress goes to stderr. No timing is asserted.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.models.clip.modeling_clip import CLIPMLP
from transformers.models.siglip.modeling_siglip import SiglipMLP

from encoder import (
    EXPERT_DISPATCH,
    CLIPMoEExperts,
    CLIPMoESparseMLP,
    CLIPMoEVisionConfig,
    CLIPMoEVisionModel,
    set_expert_dispatch,
)
from encoder.siglip import SiglipMoEVisionConfig, SiglipMoEVisionModel
from encoder.utils.files import write_atomic

MASKED_LOOP = "bench_masked_loop"
PRESETS = {
    # openai/clip-vit-large-patch14-336's vision tower (LLaVA-1.5's)
    "vit-l-336": dict(family="clip", layers=24, width=1024, heads=16, mlp=4096, image=336, patch=14),
    # google/siglip-so400m-patch14-384's vision tower (LLaVA-OneVision's)
    "siglip-so400m-384": dict(family="siglip", layers=27, width=1152, heads=16, mlp=4304, image=384, patch=14),
    # the same layer shapes, fewer layers / patches / images: a CPU run of a few minutes
    "siglip-so400m-cpu": dict(family="siglip", layers=3, width=1152, heads=16, mlp=4304, image=224, patch=14,
                              batch=2),
}


@dataclass(frozen=True)
class BenchFamily:
    """What the benchmark needs of a model family: its MoE tower classes, its dense MLP and activation."""

    config_class: type
    model_class: type
    dense_mlp_class: type[nn.Module]
    hidden_act: str
    class_token: bool  # one more token than patches (CLIP's CLS); SigLIP has none


FAMILIES = {
    "clip": BenchFamily(CLIPMoEVisionConfig, CLIPMoEVisionModel, CLIPMLP, "quick_gelu", class_token=True),
    "siglip": BenchFamily(SiglipMoEVisionConfig, SiglipMoEVisionModel, SiglipMLP, "gelu_pytorch_tanh",
                          class_token=False),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEVICE = torch.device("cpu")
DTYPE = torch.float32


def sync() -> None:
    """Wait for queued GPU work, so that wall time measures it (nothing to wait for on the CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def place(module_or_tensor):
    """Onto the benchmark's device, floating-point parts in its dtype."""
    return module_or_tensor.to(device=DEVICE, dtype=DTYPE)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def masked_loop_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Reference dispatch: for each expert, find its (token, slot) pairs, run the expert, index_add_ back."""
    out = torch.zeros_like(hidden_states)
    for e in range(self.num_experts):
        token_idx, slot = torch.where(top_k_index == e)
        if token_idx.numel() == 0:
            continue
        h = self.act_fn(nn.functional.linear(hidden_states[token_idx], self.up_proj[e], self.up_proj_bias[e]))
        y = nn.functional.linear(h, self.down_proj[e], self.down_proj_bias[e])
        out.index_add_(0, token_idx, y * top_k_weights[token_idx, slot, None])
    return out


ALL_EXPERTS_FUNCTIONS[MASKED_LOOP] = masked_loop_experts_forward


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, dict]:
    """Median / min wall time in ms of each function, measured in rotating order round by round."""
    names = list(fns)
    for i in range(warmup):
        for n in names:
            fns[n]()
        sync()
        log(f"  warm-up {i + 1}/{warmup} done")
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[: r % len(names)]:
            sync()
            t0 = time.perf_counter()
            fns[n]()
            sync()
            samples[n].append((time.perf_counter() - t0) * 1e3)
        log(f"  round {r + 1}/{repeats}: " + ", ".join(f"{n}={samples[n][-1]:.1f}" for n in names))
    return {
        n: {
            "median_ms": round(statistics.median(s), 2),
            "min_ms": round(min(s), 2),
            "samples_ms": [round(v, 3) for v in s],
        }
        for n, s in samples.items()
    }


def forward_fn(module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return module(x)

    return run


def forward_backward_fn(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, pick: Callable) -> Callable[[], None]:
    """Forward + backward to the input and every parameter; grads reset to None first, as zero_grad does."""
    def run():
        module.zero_grad(set_to_none=True)
        x.grad = None
        pick(module(x)).backward(grad)

    return run


def ratio(a: dict, b: dict) -> float:
    return round(a["median_ms"] / b["median_ms"], 3)


def paired_ratio(a: dict, b: dict) -> float:
    """Median over rounds of a/b within the same round: robust to load that comes and goes between rounds."""
    return round(statistics.median(x / y for x, y in zip(a["samples_ms"], b["samples_ms"])), 3)


def tower_config(args: argparse.Namespace, moe_layers: list[int]):
    """The family's MoE vision config (moe_layers=[]: its dense tower) at the benchmark's shapes."""
    family = FAMILIES[args.family]
    return family.config_class(
        hidden_size=args.width, intermediate_size=args.mlp, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, image_size=args.image, patch_size=args.patch,
        num_experts=args.experts, top_k=args.top_k, moe_layers=moe_layers, hidden_act=family.hidden_act,
    )


def init_moe_layer(layer: CLIPMoESparseMLP, std: float) -> None:
    """Distinct random experts (as after upcycling + training); the router keeps its default init."""
    with torch.no_grad():
        for name, p in layer.experts.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=std)
            else:
                p.normal_(std=p.shape[-1] ** -0.5)


def bench_ffn(args: argparse.Namespace, tokens: int) -> dict:
    k, h = args.top_k, args.mlp
    cfg = tower_config(args, moe_layers=[0])
    cfg._experts_implementation = "eager"
    torch.manual_seed(args.seed)
    moe = CLIPMoESparseMLP(cfg)
    init_moe_layer(moe, 0.02)
    moe = place(moe)
    variants: dict[str, nn.Module] = {"moe": moe}
    for name, impl in (("masked_loop", MASKED_LOOP), ("hf_grouped_mm", "grouped_mm")):
        c = copy.deepcopy(cfg)
        c._experts_implementation = impl
        m = CLIPMoESparseMLP(c)
        m.load_state_dict(moe.state_dict())
        variants[name] = place(m)
    # Every registered experts implementation this build can run, forced, side by side with the default ("moe").
    dispatches = [name for name, d in EXPERT_DISPATCH.items() if d.available]
    for name in dispatches:
        variants[f"moe_{name}"] = m = copy.deepcopy(moe)
        set_expert_dispatch(m, name)
    dense_cfg = copy.deepcopy(cfg)
    dense_cfg.intermediate_size = k * h
    dense = FAMILIES[args.family].dense_mlp_class(dense_cfg)
    variants["dense_2h_fused_act"] = place(_DenseAsOneExpert(dense_cfg, dense))
    variants["dense_2h"] = dense = place(dense)
    order = ["moe", "dense_2h", "masked_loop", "hf_grouped_mm", "dense_2h_fused_act", *(f"moe_{n}" for n in dispatches)]

    x = place(torch.randn(args.batch, tokens, args.width))
    with torch.no_grad():
        _, top_k_index, _ = moe.route(x.reshape(-1, args.width))
    load = torch.bincount(top_k_index.reshape(-1), minlength=args.experts).float() / top_k_index.numel()

    log("FFN forward")
    fwd = interleaved({n: forward_fn(variants[n], x) for n in order}, args.repeats, args.warmup)
    log("FFN forward+backward")
    xg = x.clone().requires_grad_()
    grad = torch.randn_like(x)
    pick = {n: (lambda out: out[0]) if isinstance(variants[n], CLIPMoESparseMLP) else (lambda out: out) for n in order}
    for m in variants.values():
        m.train()
    fb = interleaved(
        {n: forward_backward_fn(variants[n], xg, grad, pick[n]) for n in order}, args.repeats, args.warmup
    )

    pairs = [("moe", "dense_2h"), ("moe", "masked_loop"), ("moe", "hf_grouped_mm"), ("masked_loop", "dense_2h"),
             ("hf_grouped_mm", "dense_2h"), ("moe", "dense_2h_fused_act"), ("dense_2h_fused_act", "dense_2h"),
             *((f"moe_{n}", "dense_2h") for n in dispatches)]

    def ratios(t: dict, fn: Callable[[dict, dict], float]) -> dict:
        return {f"{a}_vs_{b}": fn(t[a], t[b]) for a, b in pairs}

    s = args.batch * tokens * k
    family = FAMILIES[args.family]
    act = family.hidden_act
    fused_as = {"quick_gelu": "QuickGELU fused as a scaled SiLU", "gelu_pytorch_tanh": "GELUTanh fused (aten gelu "
                "tanh into the segment buffer)"}.get(act, f"{act} fused where encoder.kernels knows it")
    unfused_as = {"quick_gelu": "its QuickGELU is three elementwise ops",
                  "gelu_pytorch_tanh": "its GELUTanh is one aten gelu(approximate='tanh')"}.get(act, act)
    return {
        "shape": {"family": args.family, "batch": args.batch, "tokens_per_sample": tokens,
                  "tokens": args.batch * tokens, "width": args.width, "expert_hidden": h, "dense_hidden": k * h,
                  "num_experts": args.experts, "top_k": k, "act": act},
        "expert_load_fraction": [round(v, 4) for v in load.tolist()],
        "implementations": {
            "moe": f"encoder.CLIPMoESparseMLP, experts_implementation='eager' (our sort + per-segment addmm, "
                   f"{fused_as})",
            "dense_2h": f"transformers {family.dense_mlp_class.__name__}, intermediate_size={k * h} (same active "
                        f"FLOPs; {unfused_as})",
            "masked_loop": "per-expert torch.where(top_k_index == e) + gather + fc1/act/fc2 + weight + index_add_",
            "hf_grouped_mm": "transformers experts_implementation='grouped_mm' (per-row bias gather)",
            **{f"moe_{n}": f"moe forced to experts dispatch {n!r}: {EXPERT_DISPATCH[n].description}"
               for n in dispatches},
            "dense_2h_fused_act": "the dense_2h weights run by encoder.CLIPMoEExperts as 1 expert, every token "
                                  "routed to it with weight 1 (moe's fused activation, no router)",
            "hf_batched_mm": (
                "skipped: gathers per-token weight copies up_proj[expert_ids] / down_proj[expert_ids], "
                f"2 x {s} x {h} x {args.width} fp32 = {2 * s * h * args.width * 4 / 2**30:.1f} GiB at these shapes"
            ),
        },
        "forward": {"times": fwd, "ratios": ratios(fwd, ratio), "paired_ratios": ratios(fwd, paired_ratio)},
        "forward_backward": {"times": fb, "ratios": ratios(fb, ratio), "paired_ratios": ratios(fb, paired_ratio)},
    }


def bench_tower(args: argparse.Namespace, tokens: int) -> dict:
    k = args.top_k
    torch.manual_seed(args.seed)
    moe_cfg = tower_config(args, moe_layers=list(range(args.layers)))
    dense_cfg = tower_config(args, moe_layers=[])
    model_class = FAMILIES[args.family].model_class
    moe = place(model_class(moe_cfg))
    dense = place(model_class(dense_cfg))
    mlps = nn.Sequential(*[layer.mlp for layer in dense.encoder.layers])

    pixels = place(torch.randn(args.batch, 3, args.image, args.image))
    hidden = place(torch.randn(args.batch, tokens, args.width))
    with torch.no_grad():
        out = moe.eval()(pixels, output_router_logits=True)
    loads = []
    for logits in out.router_logits:
        idx = torch.topk(logits, k, dim=-1).indices
        loads.append(torch.bincount(idx.reshape(-1), minlength=args.experts).float() / idx.numel())
    loads = torch.stack(loads)

    def run_mlps(x: torch.Tensor) -> list[torch.Tensor]:
        """Each dense MLP on the same hidden-state shape (no residual chain: only the MLP cost counts)."""
        return [mlp(x) for mlp in mlps]

    def fwd_fn(model: nn.Module) -> Callable[[], object]:
        def run():
            with torch.no_grad():
                return model(pixels).last_hidden_state

        return run

    mlps_fwd = forward_fn(_Apply(run_mlps), hidden)
    log("tower forward")
    for m in (moe, dense, mlps):
        m.eval()
    fwd = interleaved({"moe": fwd_fn(moe), "dense": fwd_fn(dense), "dense_mlps": mlps_fwd}, args.repeats, args.warmup)

    log("tower forward+backward")
    for m in (moe, dense, mlps):
        m.train()
    grad_last = place(torch.randn(args.batch, tokens, args.width))
    grad_pool = place(torch.randn(args.batch, args.width))

    def fb_fn(model: nn.Module) -> Callable[[], None]:
        def run():
            model.zero_grad(set_to_none=True)
            o = model(pixels)
            torch.autograd.backward([o.last_hidden_state, o.pooler_output], [grad_last, grad_pool])

        return run

    hidden_g = hidden.clone().requires_grad_()

    def mlps_fb():
        mlps.zero_grad(set_to_none=True)
        hidden_g.grad = None
        torch.autograd.backward(run_mlps(hidden_g), [grad_last] * len(mlps))

    fb = interleaved({"moe": fb_fn(moe), "dense": fb_fn(dense), "dense_mlps": mlps_fb}, args.repeats, args.warmup)

    def summary(t: dict) -> dict:
        ideal = t["dense"]["median_ms"] + (k - 1) * t["dense_mlps"]["median_ms"]
        ideal_rounds = [d + (k - 1) * m for d, m in zip(t["dense"]["samples_ms"], t["dense_mlps"]["samples_ms"])]
        ideal_samples = {"samples_ms": ideal_rounds}
        return {
            "times": t,
            "images_per_s": {n: round(args.batch / (t[n]["median_ms"] / 1e3), 1) for n in ("moe", "dense")},
            "ideal_ms": round(ideal, 2),
            "ratios": {
                "tower_moe_vs_ideal": round(t["moe"]["median_ms"] / ideal, 3),
                "tower_moe_vs_dense": ratio(t["moe"], t["dense"]),
                "mlp_share_of_dense_tower": ratio(t["dense_mlps"], t["dense"]),
            },
            "paired_ratios": {
                "tower_moe_vs_ideal": paired_ratio(t["moe"], ideal_samples),
                "tower_moe_vs_dense": paired_ratio(t["moe"], t["dense"]),
            },
        }

    return {
        "config": {"family": args.family, "model": model_class.__name__, "hidden_act": moe_cfg.hidden_act,
                   "layers": args.layers, "width": args.width, "heads": args.heads, "mlp": args.mlp,
                   "image": args.image, "patch": args.patch, "tokens_per_sample": tokens, "batch": args.batch,
                   "num_experts": args.experts, "top_k": k, "moe_layers": "all",
                   "attn_implementation": moe.config._attn_implementation,
                   "experts_implementation": moe.config._experts_implementation,
                   "output_router_logits": False},
        "ideal": "dense tower + (top_k - 1) x (the dense tower's encoder-layer MLPs alone on a [batch, tokens, "
                 "width] input)" + ("; SigLIP's attention-pooling head (its MLP dense in both towers) is in the dense "
                                    "tower's time" if args.family == "siglip" else ""),
        "expert_load_fraction_min_max": [round(loads.min().item(), 4), round(loads.max().item(), 4)],
        "forward": summary(fwd),
        "forward_backward": summary(fb),
    }


class _DenseAsOneExpert(nn.Module):
    """A dense MLP's (fc1 -> act -> fc2: CLIPMLP, SiglipMLP) weights run by our experts code as a single expert that
    takes every token."""

    def __init__(self, config, dense: nn.Module):
        super().__init__()
        cfg = copy.deepcopy(config)
        cfg.num_experts, cfg.top_k = 1, 1
        cfg._experts_implementation = "eager"
        self.experts = CLIPMoEExperts(cfg)
        with torch.no_grad():
            self.experts.up_proj.copy_(dense.fc1.weight[None])
            self.experts.up_proj_bias.copy_(dense.fc1.bias[None])
            self.experts.down_proj.copy_(dense.fc2.weight[None])
            self.experts.down_proj_bias.copy_(dense.fc2.bias[None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        index = torch.zeros(flat.shape[0], 1, dtype=torch.long, device=flat.device)
        return self.experts(flat, index, flat.new_ones(flat.shape[0], 1)).view_as(x)


class _Apply(nn.Module):
    """Wraps a function as a module so forward_fn can time it."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor):
        return self.fn(x)


def cpu_model() -> str:
    """The CPU's marketing name where /proc/cpuinfo has it (Linux), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7, help="timed rounds per comparison (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--batch", type=int, default=8, help="images per batch (FFN tokens = batch x tokens/image)")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--mlp", type=int, default=3072, help="expert / dense MLP hidden size h")
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-ffn", action="store_true", help="only the tower comparison")
    p.add_argument("--skip-tower", action="store_true", help="only the FFN comparison")
    p.add_argument("--output", type=Path, help="also write the JSON to this file")
    p.add_argument("--note", help="free text stored in the JSON (e.g. what else ran on the machine)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="weights and inputs (default: float32)")
    p.add_argument("--family", choices=tuple(FAMILIES), default="clip",
                   help="whose MLP / tower: clip (QuickGELU, CLS token) or siglip (gelu_pytorch_tanh, no CLS token)")
    p.add_argument("--preset", choices=tuple(PRESETS),
                   help="model shapes of a real tower (overrides the shape flags and --family)")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke config (2 layers, width 64, 32px images, batch 2, 2 rounds)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device is visible here")
    if args.preset:
        vars(args).update(PRESETS[args.preset])
    if args.quick:
        args.layers, args.width, args.heads, args.mlp = 2, 64, 4, 128
        args.image, args.patch, args.batch, args.repeats, args.warmup = 32, 8, 2, 2, 1
    return args


def main(argv: list[str] | None = None) -> None:
    global DEVICE, DTYPE
    args = parse_args(argv)
    DEVICE, DTYPE = torch.device(args.device), DTYPES[args.dtype]
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    tokens = (args.image // args.patch) ** 2 + int(FAMILIES[args.family].class_token)
    result: dict = {
        "benchmark": "scripts/bench_moe.py",
        "command": shlex.join(["python", "scripts/bench_moe.py", *(sys.argv[1:] if argv is None else argv)]),
        "device": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "machine": f"{os.cpu_count()}-core CPU ({cpu_model()})",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "timing": {"repeats": args.repeats, "warmup": args.warmup,
                   "method": "interleaved rounds in rotating order; median (and min) wall time per implementation",
                   "ratios": "median of a / median of b",
                   "paired_ratios": "median over rounds of a / b within a round (robust to load between rounds)"},
        "forward_mode": "torch.no_grad()",
        "forward_backward_mode": "train(); grads set to None each step; backward to input and all parameters",
    }
    if args.preset:
        result["preset"] = {"name": args.preset, **PRESETS[args.preset]}
    if args.note:
        result["note"] = args.note
    result["loadavg_1min_start"] = round(os.getloadavg()[0], 2)
    if not args.skip_ffn:
        result["ffn"] = bench_ffn(args, tokens)
    if not args.skip_tower:
        result["tower"] = bench_tower(args, tokens)
    result["loadavg_1min_end"] = round(os.getloadavg()[0], 2)
    text = json.dumps(result, indent=2)
    if args.output is not None:  # renamed into place: an earlier result stays whole if this write fails
        write_atomic(args.output, lambda tmp: tmp.write_text(text + "\n"), flag="--output")
    print(text)


if __name__ == "__main__":
    main()
