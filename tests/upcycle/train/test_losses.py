"""The contrastive losses against their references: SigLIP's sigmoid loss equals transformers' `SiglipModel`
loss and open_clip's `SigLipLoss`, on one process and across two gloo processes."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from open_clip.loss import ClipLoss, SigLipLoss
from transformers import SiglipConfig, SiglipModel

from upcycle.train.losses import clip_contrastive_loss, siglip_sigmoid_loss

WORLD = 2


def _batch(n: int, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """L2-normalised image/text embeddings [n, dim] (texts near their images, so positives matter), a scale
    multiplier and a bias away from open_clip's init (scale 10, bias -10) so both gradients are sizeable."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, dim, generator=g)
    text = image + 0.7 * torch.randn(n, dim, generator=g)
    return (torch.nn.functional.normalize(image, dim=-1), torch.nn.functional.normalize(text, dim=-1),
            torch.tensor(7.0), torch.tensor(-2.5))


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _loss_and_grads(loss_fn, image, text, scale, bias) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = _leaves(image, text, scale, bias)
    loss = loss_fn(*leaves)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


def _close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-5) -> None:
    diff = (a - b).abs().max().item()
    assert diff <= tol * max(1.0, b.abs().max().item()), f"{what}: max abs diff {diff:.2e}"


def test_equals_siglip_model_loss():
    """transformers' SiglipModel(return_loss=True) is the judge: the same loss from its embeddings, logit_scale
    (passed as the multiplier, exp'd) and logit_bias, and the same gradients for both."""
    torch.manual_seed(0)
    config = SiglipConfig(
        text_config={"vocab_size": 99, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 16},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
    )
    model = SiglipModel(config).eval()
    with torch.no_grad():  # away from the zero init, so that a misplaced bias or scale changes the loss
        model.logit_scale.fill_(math.log(9.0))
        model.logit_bias.fill_(-3.0)
    g = torch.Generator().manual_seed(1)
    out = model(input_ids=torch.randint(0, 99, (5, 16), generator=g), pixel_values=torch.randn(5, 3, 32, 32,
                                                                                                 generator=g),
                return_loss=True)
    ours = siglip_sigmoid_loss(out.image_embeds, out.text_embeds, model.logit_scale.exp(), model.logit_bias)
    _close(ours, out.loss, "loss vs SiglipModel")
    expected = torch.autograd.grad(out.loss, [model.logit_scale, model.logit_bias], retain_graph=True)
    got = torch.autograd.grad(ours, [model.logit_scale, model.logit_bias])
    _close(got[0], expected[0], "d loss / d logit_scale")
    _close(got[1], expected[1], "d loss / d logit_bias")


def test_equals_open_clip_siglip_loss_and_differs_from_clip_loss():
    image, text, scale, bias = _batch(6)
    ours, our_grads = _loss_and_grads(siglip_sigmoid_loss, image, text, scale, bias)
    ref, ref_grads = _loss_and_grads(SigLipLoss(), image, text, scale, bias)
    _close(ours, ref, "loss vs open_clip SigLipLoss")
    for what, a, b in zip(("image", "text", "logit_scale", "logit_bias"), our_grads, ref_grads):
        _close(a, b, f"d loss / d {what}")
    # The pairing matters: the images matched to shuffled texts give another loss.
    assert (siglip_sigmoid_loss(image, text.roll(1, 0), scale, bias) - ours).abs() > 0.1
    # Not the softmax loss under another name (which also ignores the bias).
    assert (clip_contrastive_loss(image, text, scale) - ours).abs() > 0.1
    _close(clip_contrastive_loss(image, text, scale), ClipLoss()(image, text, scale), "clip loss vs open_clip")


def _rank_worker(rank: int, store: str, out: str) -> None:
    """One gloo process: this rank's slice of the global batch, our loss and open_clip's, their gradients."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        image, text, scale, bias = _batch(3 * WORLD)
        rows = slice(3 * rank, 3 * (rank + 1))
        results = {"ours": _loss_and_grads(siglip_sigmoid_loss, image[rows], text[rows], scale, bias)}
        for impl in ("bidir", "gather"):
            loss_fn = SigLipLoss(rank=rank, world_size=WORLD, dist_impl=impl)
            results[impl] = _loss_and_grads(loss_fn, image[rows], text[rows], scale, bias)
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture
def spawnable(monkeypatch):
    """Lets spawned processes import `_rank_worker`: pytest imports this file under a dotted name that a fresh
    interpreter cannot resolve (a site-packages `tests` package shadows ours), so for this test the module is
    offered under its file name from its own folder."""
    stem = Path(__file__).stem
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.setitem(sys.modules, stem, sys.modules[__name__])
    monkeypatch.setattr(_rank_worker, "__module__", stem)


@pytest.mark.engines
def test_distributed_loss_sees_every_negative(tmp_path, spawnable):
    """Two gloo processes, 3 pairs each, against one process over the 6 concatenated pairs (loss L, gradients g).

    Each rank's loss is normalised by its local batch, as open_clip's: the ranks' losses sum to WORLD * L (their
    mean is L). Each rank's images meet all 6 texts and its texts' gradients come back from the other rank, so the
    embedding gradients on a rank are WORLD * g for its rows; logit_scale and logit_bias get the rank's own
    gradient, whose mean over ranks is g. Either way DDP's average over ranks yields exactly g. open_clip's
    SigLipLoss (neighbour exchange and all_gather) agrees with ours rank by rank.
    """
    mp.spawn(_rank_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    loss, (g_image, g_text, g_scale, g_bias) = _loss_and_grads(siglip_sigmoid_loss, *_batch(3 * WORLD))

    _close(sum(r["ours"][0] for r in ranks), WORLD * loss, "sum of rank losses vs WORLD * global loss")
    _close(sum(r["ours"][1][2] for r in ranks) / WORLD, g_scale, "mean d/d logit_scale")
    _close(sum(r["ours"][1][3] for r in ranks) / WORLD, g_bias, "mean d/d logit_bias")
    for rank, result in enumerate(ranks):
        rows = slice(3 * rank, 3 * (rank + 1))
        our_loss, (image, text, scale, bias) = result["ours"]
        _close(image, WORLD * g_image[rows], f"rank {rank} image gradients")
        _close(text, WORLD * g_text[rows], f"rank {rank} text gradients")
        for impl in ("bidir", "gather"):
            ref_loss, ref_grads = result[impl]
            _close(our_loss, ref_loss, f"rank {rank} loss vs open_clip {impl}")
            for what, a, b in zip(("image", "text", "logit_scale", "logit_bias"), (image, text, scale, bias),
                                  ref_grads):
                _close(a, b, f"rank {rank} d/d {what} vs open_clip {impl}")
