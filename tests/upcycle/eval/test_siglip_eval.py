"""Retrieval and zero-shot classification of a SigLIP, judged by transformers' `SiglipModel` fed as its docs say
(`padding="max_length"`, its image processor): the metrics equal those computed by hand from its own logits."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from encoder.siglip import sparse_upcycle_siglip
from upcycle.data import read_pairs
from upcycle.eval.embedding import encode_pairs
from upcycle.eval.retrieval import retrieval_metrics
from upcycle.eval.routing import routing_stats
from upcycle.eval.zero_shot import class_embeddings, topk_accuracy


@pytest.fixture(scope="module")
def pairs(grids_dir):
    """Pairs with distinct captions and images, so that the model's [N, N] logits are the whole task."""
    seen, chosen = set(), []
    for pair in read_pairs(grids_dir / "train.json"):
        if pair.caption not in seen:
            seen.add(pair.caption)
            chosen.append(pair)
    return chosen[:20]


def siglip_logits(model, tokenizer, processor, pairs) -> torch.Tensor:
    """SiglipModel's own logits_per_image [images, texts], fed as transformers' SigLIP docs feed it: its image
    processor, and captions padded to max_length (the model's context) with no attention mask, as it was trained."""
    length = model.config.text_config.max_position_embeddings
    tokens = tokenizer([p.caption for p in pairs], padding="max_length", max_length=length, truncation=True,
                       return_tensors="pt")
    pixels = processor(images=[Image.open(p.image).convert("RGB") for p in pairs],
                                      return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model(input_ids=tokens["input_ids"], pixel_values=pixels).logits_per_image


def recall_by_hand(scores: torch.Tensor, k: int) -> float:
    """Percent of rows whose diagonal entry has fewer than k others scoring at least as high (ties count against)."""
    own = scores.diagonal().unsqueeze(1)
    return 100.0 * (((scores >= own).sum(dim=1) - 1) < k).double().mean().item()


def test_retrieval_of_a_siglip_equals_its_own_logits_by_hand(make_tiny_siglip, siglip_tokenizer, siglip_processor, pairs):
    model = make_tiny_siglip()
    image_emb, text_emb = encode_pairs(model, pairs, siglip_processor, siglip_tokenizer, batch_size=7)
    metrics = retrieval_metrics(image_emb, text_emb, [p.caption for p in pairs], [p.image for p in pairs])
    logits = siglip_logits(model, siglip_tokenizer, siglip_processor, pairs)
    expected = {f"{way}_r{k}": recall_by_hand(scores, k) for way, scores in (("i2t", logits), ("t2i", logits.T))
                for k in (1, 5, 10)}
    assert {key: metrics[key] for key in expected} == pytest.approx(expected)
    assert 0 < expected["i2t_r10"] < 100  # neither nothing nor everything: the ranking is exercised
    scale, bias = model.logit_scale.exp(), model.logit_bias
    torch.testing.assert_close(scale * image_emb @ text_emb.T + bias, logits, rtol=1e-5, atol=1e-5)


def test_siglip_captions_are_fed_padded_and_unmasked_as_it_was_trained(make_tiny_siglip, siglip_tokenizer, siglip_processor, pairs):
    """A CLIP-style feed (padded to the longest caption, padding masked) gives other embeddings: the last position
    SigLIP pools is then another token."""
    model = make_tiny_siglip()
    _, text_emb = encode_pairs(model, pairs, siglip_processor, siglip_tokenizer)
    tokens = siglip_tokenizer([p.caption for p in pairs], padding=True, return_tensors="pt")
    with torch.no_grad():
        masked = model.get_text_features(**tokens).pooler_output
    assert not torch.allclose(text_emb, torch.nn.functional.normalize(masked, dim=-1), atol=1e-3)


def test_zero_shot_of_a_siglip_ranks_classes_as_its_sigmoid_logits_do(make_tiny_siglip, siglip_tokenizer, siglip_processor, pairs):
    model = make_tiny_siglip(seed=3)
    names = [p.caption for p in pairs]  # each pair's class is its caption, the prompt the class name itself
    image_emb, _ = encode_pairs(model, pairs, siglip_processor, siglip_tokenizer)
    accuracy = topk_accuracy(image_emb, class_embeddings(model, siglip_tokenizer, names, ["{}"]), range(len(names)))
    logits = siglip_logits(model, siglip_tokenizer, siglip_processor, pairs)
    probabilities = torch.sigmoid(logits)  # SigLIP's per-pair probabilities: the same order as the logits
    assert accuracy == pytest.approx({"top1": recall_by_hand(probabilities, 1), "top5": recall_by_hand(logits, 5)})
    assert 0 < accuracy["top5"] < 100


def test_routing_of_a_siglip_moe_counts_every_text_position(make_tiny_siglip, siglip_tokenizer, siglip_processor, pairs):
    """No mask reaches a SigLIP text tower, so every one of its max_position_embeddings positions is routed and counted."""
    moe = sparse_upcycle_siglip(make_tiny_siglip(), vision_moe=dict(num_experts=2, top_k=1, moe_layers=[1]),
                                text_moe=dict(num_experts=2, top_k=1, moe_layers=[0]))
    stats = routing_stats(moe, pairs[:5], siglip_processor, siglip_tokenizer, batch_size=2)
    assert stats["towers"]["text"]["layers"][0]["tokens"] == 5 * moe.config.text_config.max_position_embeddings
    assert stats["towers"]["vision"]["layers"][0]["tokens"] == 5 * 16  # 16 patches, no class token



def test_upcycle_eval_of_a_siglip_directory_reports_its_own_metrics(siglip_dir, siglip_tokenizer, siglip_processor,
                                                                     pairs, tmp_path, capsys):
    """The command loads the directory's SigLIP, image processor and tokenizer and feeds them as the library does."""
    import json

    from encoder.loading import load_clip
    from upcycle.cli import main

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"image": p.image, "caption": p.caption}) + "\n" for p in pairs))
    assert main(["eval", "--model", str(siglip_dir), "--data", str(data)]) == 0
    result = json.loads(capsys.readouterr().out)
    logits = siglip_logits(load_clip(siglip_dir).model, siglip_tokenizer, siglip_processor, pairs)
    for way, scores in (("i2t", logits), ("t2i", logits.T)):
        for k in (1, 5, 10):
            assert result[f"{way}_r{k}"] == pytest.approx(round(recall_by_hand(scores, k), 4))


def test_routing_a_dense_siglip_is_refused_in_one_line(siglip_dir, grids_dir, tmp_path, capsys):
    from upcycle.cli import main

    png = tmp_path / "routing.png"
    assert main(["routing", "--model", str(siglip_dir), "--data", str(grids_dir / "train.json"),
                 "--out-png", str(png)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SigLIP-MoE" in err[0] and "nothing to route" in err[0] and not png.exists()
