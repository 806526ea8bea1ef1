"""Zero-shot retrieval: recall (duplicate captions, shared images) against hand-made scores and a loop reference,
and `python -m upcycle eval` on a dense CLIP and its sparse-upcycled MoE."""

import json

import pytest
import torch
import torch.nn.functional as F

from encoder.loading import load_clip
from encoder.save import save_clip_moe
from upcycle.cli import main
from upcycle.data import read_pairs
from upcycle.eval.embedding import encode_pairs, encode_texts
from upcycle.eval.retrieval import retrieval_hits, retrieval_metrics
from upcycle.recipes.sparse import sparse_upcycle

RECALLS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


@pytest.fixture(scope="module")
def models(tmp_path_factory, base_clip_dir):  # noqa: F811
    """{"dense": the tiny random base CLIP's directory, "moe": its sparse-upcycled CLIP-MoE's}."""
    moe_dir = tmp_path_factory.mktemp("eval") / "moe"
    base = load_clip(base_clip_dir)
    save_clip_moe(sparse_upcycle(base.model, num_experts=4, top_k=2), moe_dir, base.image_processor, base.tokenizer)
    return {"dense": base_clip_dir, "moe": moe_dir}


@pytest.fixture(scope="module")
def dense(models):
    return load_clip(models["dense"])


@pytest.fixture(scope="module")
def test_data(grids_dir):  # noqa: F811
    return grids_dir / "test.json"


def reference_recall(scores: torch.Tensor, positives: list[set[int]], k: int) -> float:
    """Plain loops: percent of queries whose best positive has fewer than k negatives scoring as high or higher."""
    hits = 0
    for q, pos in enumerate(positives):
        best = max(scores[q, g] for g in pos)
        above = sum(1 for g in range(scores.shape[1]) if g not in pos and scores[q, g] >= best)
        hits += above < k
    return 100.0 * hits / len(positives)


def test_retrieval_recall_on_hand_made_scores():
    # texts are the unit vectors, so image i's score for text j is scores[i][j]
    scores = torch.tensor([[0.9, 0.1, 0.0, 0.0],   # own text first
                           [0.8, 0.5, 0.2, 0.0],   # own text second
                           [0.3, 0.2, 0.1, 0.4],   # own text last
                           [0.0, 0.0, 0.0, 1.0]])  # own text first
    m = retrieval_metrics(scores, torch.eye(4), ["a", "b", "c", "d"])
    # text -> image reads the columns: text 2's own image scores 0.1 behind image 1's 0.2
    assert m == {"i2t_r1": 50.0, "i2t_r5": 100.0, "i2t_r10": 100.0, "t2i_r1": 75.0, "t2i_r5": 100.0,
                 "t2i_r10": 100.0, "n_images": 4, "n_texts": 4}
    collapsed = retrieval_metrics(torch.ones(12, 2), torch.ones(12, 2), [str(i) for i in range(12)])
    assert collapsed["i2t_r10"] == collapsed["t2i_r10"] == 0.0  # ties count against the query


def test_per_query_hits_on_hand_made_scores():
    scores = torch.tensor([[0.9, 0.1, 0.0, 0.0],
                           [0.8, 0.5, 0.2, 0.0],
                           [0.3, 0.2, 0.1, 0.4],
                           [0.0, 0.0, 0.0, 1.0]])
    hits = {key: h.tolist() for key, h in retrieval_hits(scores, torch.eye(4), ["a", "b", "c", "d"]).items()}
    assert hits == {"i2t_r1": [True, False, False, True], "i2t_r5": [True] * 4, "i2t_r10": [True] * 4,
                    "t2i_r1": [True, True, False, True], "t2i_r5": [True] * 4, "t2i_r10": [True] * 4}


def test_identical_captions_are_one_text():
    e = torch.eye(3)
    cat, cat_again, dog = e[0], F.normalize(e[0] - 0.01 * e[2], dim=0), e[1]  # the same string, encoded twice
    images = torch.stack([e[0], F.normalize(torch.tensor([0.9, 0.1, 0.4]), dim=0), e[1]])
    m = retrieval_metrics(images, torch.stack([cat, cat_again, dog]), ["a cat", "a cat", "a dog"])
    # Pair by pair, image 1 would rank "its" second copy of "a cat" below the first copy, and the query "a cat"
    # of pair 1 would find image 0 above image 1: both would miss at R@1 although the retrieval is right.
    assert m["n_texts"] == 2 and m["n_images"] == 3
    assert m["i2t_r1"] == 100.0 and m["t2i_r1"] == 100.0


def test_image_ids_merge_an_image_with_several_captions():
    e = torch.eye(3)
    image_a = F.normalize(e[1] + 0.5 * e[2], dim=0)  # closest to its 2nd caption, the 1st one ranks last
    images, texts = torch.stack([image_a, image_a, e[2]]), e
    captions = ["x", "y", "z"]
    merged = retrieval_metrics(images, texts, captions, image_ids=["a.png", "a.png", "b.png"])
    assert merged["n_images"] == 2 and merged["i2t_r1"] == 100.0
    per_pair = retrieval_metrics(images, texts, captions)
    assert per_pair["n_images"] == 3 and per_pair["i2t_r1"] == pytest.approx(200 / 3)


def test_retrieval_matches_a_loop_reference_and_is_monotone_in_k():
    g = torch.Generator().manual_seed(0)
    n = 40
    captions = [f"caption {i % 25}" for i in range(n)]  # 15 captions appear twice
    images = F.normalize(torch.randn(n, 8, generator=g), dim=-1)
    texts = F.normalize(torch.randn(n, 8, generator=g), dim=-1)
    m = retrieval_metrics(images, texts, captions, chunk_size=7)

    unique = list(dict.fromkeys(captions))
    first_text = torch.stack([texts[captions.index(c)] for c in unique])
    scores = images @ first_text.T
    i2t_pos = [{unique.index(c)} for c in captions]
    t2i_pos = [{i for i, c in enumerate(captions) if c == u} for u in unique]
    for k in (1, 5, 10):
        assert m[f"i2t_r{k}"] == pytest.approx(reference_recall(scores, i2t_pos, k))
        assert m[f"t2i_r{k}"] == pytest.approx(reference_recall(scores.T, t2i_pos, k))
    for way in ("i2t", "t2i"):
        assert m[f"{way}_r1"] <= m[f"{way}_r5"] <= m[f"{way}_r10"]
    assert 0 < m["i2t_r1"] < m["i2t_r10"] < 100  # the case is not degenerate


def test_hits_are_per_unique_query_and_average_to_the_recalls():
    g = torch.Generator().manual_seed(1)
    n = 30
    captions = [f"caption {i % 20}" for i in range(n)]  # 10 captions appear twice: 20 text queries
    image_ids = [f"{i % 24}.png" for i in range(n)]  # 6 images appear twice: 24 image queries
    images = F.normalize(torch.randn(n, 8, generator=g), dim=-1)
    texts = F.normalize(images + 0.8 * torch.randn(n, 8, generator=g), dim=-1)  # related, so some queries hit
    hits = retrieval_hits(images, texts, captions, image_ids, chunk_size=7)
    shapes = {key: (h.dtype, tuple(h.shape)) for key, h in hits.items()}
    assert shapes == {**{f"i2t_r{k}": (torch.bool, (24,)) for k in (1, 5, 10)},
                      **{f"t2i_r{k}": (torch.bool, (20,)) for k in (1, 5, 10)}}
    m = retrieval_metrics(images, texts, captions, image_ids)
    assert (m["n_images"], m["n_texts"]) == (24, 20)
    for key in RECALLS:
        assert m[key] == pytest.approx(100.0 * hits[key].double().mean().item())
    for way in ("i2t", "t2i"):  # a hit at 1 is a hit at 5 is a hit at 10, query by query
        r1, r5, r10 = (hits[f"{way}_r{k}"] for k in (1, 5, 10))
        assert bool((r1 <= r5).all() and (r5 <= r10).all())
    assert 0 < int(hits["i2t_r1"].sum()) < int(hits["i2t_r10"].sum()) < 24  # not degenerate


def test_encode_pairs_is_normalised_in_pair_order_and_equal_for_the_upcycled_moe(models, dense, test_data):
    pairs = read_pairs(test_data)
    n = len(pairs)
    image_emb, text_emb = encode_pairs(dense.model, pairs, dense.image_processor, dense.tokenizer, batch_size=5)
    assert image_emb.shape == text_emb.shape == (n, dense.model.config.projection_dim)
    assert image_emb.dtype == torch.float32 and torch.allclose(image_emb.norm(dim=-1), torch.ones(n))
    assert torch.allclose(text_emb, encode_texts(dense.model, dense.tokenizer, [p.caption for p in pairs]),
                          atol=1e-5)
    moe = load_clip(models["moe"])
    moe.model.train()
    moe_image, moe_text = encode_pairs(moe.model, pairs, moe.image_processor, moe.tokenizer, batch_size=5)
    assert moe.model.training  # encoding ran in eval mode and gave the mode back
    assert torch.allclose(image_emb, moe_image, atol=1e-5) and torch.allclose(text_emb, moe_text, atol=1e-5)


def run_eval(capsys, *args) -> tuple[int, str, str]:
    rc = main(["eval", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_eval_cli_dense_and_sparse_upcycled_moe_agree(models, test_data, tmp_path, capsys):
    captions = [p.caption for p in read_pairs(test_data)]
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps(sorted(set(captions))))
    templates = tmp_path / "templates.txt"
    templates.write_text("{}\n")
    results = {}
    for name, model_dir in models.items():
        out_file = tmp_path / f"{name}.json"
        rc, out, _ = run_eval(capsys, "--model", model_dir, "--data", test_data, "--forward-batch-size", 5,
                              "--digit-positions", "--classes", classes, "--templates", templates, "--out", out_file)
        assert rc == 0
        results[name] = json.loads(out)
        assert json.loads(out_file.read_text()) == results[name]
    dense, moe = results["dense"], results["moe"]
    assert dense.pop("model") == str(models["dense"]) and moe.pop("model") == str(models["moe"])
    assert dense == moe  # sparse upcycling is exact
    assert set(RECALLS) <= dense.keys() and dense["n_pairs"] == len(captions)
    assert list(dense["digit_positions"]) == ["top left", "top right", "bottom left", "bottom right", "mean"]
    # classes = the distinct captions, prompt = the caption itself: classification is image->text retrieval
    assert (dense["zero_shot_top1"], dense["zero_shot_top5"]) == (dense["i2t_r1"], dense["i2t_r5"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


@pytest.mark.parametrize("case", ["missing_data", "unmatched_class", "bad_template", "templates_alone"])
def test_eval_bad_input_is_one_line(case, models, test_data, tmp_path, capsys):
    first_caption = read_pairs(test_data)[0].caption
    (tmp_path / "classes.txt").write_text("top left 0\n")
    (tmp_path / "templates.txt").write_text("a photo of a digit\n")
    args = {"missing_data": ["--data", tmp_path / "nowhere.json"],
            "unmatched_class": ["--data", test_data, "--classes", tmp_path / "classes.txt"],
            "bad_template": ["--data", test_data, "--classes", tmp_path / "classes.txt",
                             "--templates", tmp_path / "templates.txt"],
            "templates_alone": ["--data", test_data, "--templates", tmp_path / "templates.txt"]}[case]
    expect = {"missing_data": "does not exist", "unmatched_class": repr(first_caption), "bad_template": "no {}",
              "templates_alone": "give --classes"}[case]
    rc, out, err = run_eval(capsys, "--model", models["dense"], *args)
    assert rc == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and expect in err
