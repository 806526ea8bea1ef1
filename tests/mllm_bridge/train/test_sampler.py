"""`--group_by_modality_length`: LLaVA's modality- and length-grouped batches, planned per epoch, over 1 and 2 ranks."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from mllm_bridge.train.conversation import Prompt
from mllm_bridge.train.data import Sample, modality_lengths
from mllm_bridge.train.sampler import ModalityLengthBatchSampler


def mixed_lengths(images=70, texts=45, seed=0) -> np.ndarray:
    """Image samples (> 0) and text-only samples (< 0) of random lengths, interleaved at random."""
    rng = np.random.default_rng(seed)
    lengths = np.concatenate([rng.integers(5, 400, images), -rng.integers(5, 400, texts)])
    return lengths[rng.permutation(len(lengths))]


def rank_batches(lengths, batch, ranks, **kw) -> list[list[list[int]]]:
    """What each rank's sampler yields in one epoch: [rank][step] -> indices."""
    return [list(ModalityLengthBatchSampler(lengths, batch, ranks, rank, **kw)) for rank in range(ranks)]


@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("accumulation", [1, 3])
def test_every_sample_once_per_epoch_and_one_modality_per_batch(ranks, accumulation):
    lengths = mixed_lengths(images=70, texts=46)  # even counts: with 2 ranks nothing needs to be left out
    per_rank = rank_batches(lengths, 4, ranks, seed=1, accumulation=accumulation)
    sampler = ModalityLengthBatchSampler(lengths, 4, ranks, seed=1, accumulation=accumulation)
    assert sampler.dropped_per_epoch == 0
    assert all(len(r) == sampler.batches_per_epoch == len(sampler) for r in per_rank)
    seen = Counter(i for r in per_rank for b in r for i in b)
    assert sorted(seen) == list(range(len(lengths))) and set(seen.values()) == {1}
    for step in range(sampler.batches_per_epoch):
        shares = [per_rank[r][step] for r in range(ranks)]
        assert len({len(s) for s in shares}) == 1  # equal shares: DDP needs every rank in every step
        signs = {np.sign(lengths[i]) for s in shares for i in s}
        assert len(signs) == 1  # the whole global micro-batch is one modality


def test_mega_batches_are_sorted_and_balanced_across_ranks():
    lengths = mixed_lengths(images=160, texts=96, seed=3)
    sampler = ModalityLengthBatchSampler(lengths, 8, 2, seed=0, accumulation=2)
    megas = sampler.megabatches()
    full = [m for m in megas if sum(map(len, m)) == sampler.megabatch_size]
    assert len(full) == 160 // 32 + 96 // 32 and megas[:len(full)] == full  # incomplete ones last
    for mega in full:
        chunks = [batch[r * 8:(r + 1) * 8] for batch in mega for r in range(2)]  # the 4 per-device batches
        sizes = [np.abs(lengths[c]) for c in chunks]
        assert all((np.diff(s) <= 0).all() for s in sizes)  # each dealt longest first
        totals = [s.sum() for s in sizes]
        # Greedy dealing of a sorted mega-batch keeps the per-device sums within one sample of each other.
        assert max(totals) - min(totals) <= np.abs(lengths[np.concatenate(chunks)]).max()
        # ... and each per-device batch spans the mega-batch's range (long and short together), as in LLaVA.
        everything = np.sort(np.abs(lengths[np.concatenate(chunks)]))[::-1]
        assert {s[0] for s in sizes} == set(everything[:4])


def test_the_plan_follows_seed_and_epoch_and_resumes_mid_epoch():
    lengths = mixed_lengths()
    a, b = ModalityLengthBatchSampler(lengths, 4, seed=5), ModalityLengthBatchSampler(lengths, 4, seed=5)
    assert list(a) == list(b)
    epoch0 = list(a)
    a.set_epoch(1)
    assert list(a) != epoch0
    b.set_epoch(1, start_batch=7)
    assert list(b) == list(a)[7:] and len(b) == a.batches_per_epoch - 7
    other_seed = ModalityLengthBatchSampler(lengths, 4, seed=6)
    assert list(other_seed) != epoch0
    # The shuffle mixes the modalities' full mega-batches; only the two tails come last, image tail first.
    signs = [int(np.sign(lengths[batch[0]])) for batch in epoch0]
    assert signs[-2:] == [1, -1] and signs[:-2] != sorted(signs[:-2])


def test_odd_tails_leave_out_fewer_than_one_sample_per_rank():
    lengths = mixed_lengths(images=37, texts=23)  # 37 = 4 * 8 + 5, 23 = 2 * 8 + 7
    per_rank = rank_batches(lengths, 4, 2, seed=0)
    sampler = ModalityLengthBatchSampler(lengths, 4, 2, seed=0)
    assert sampler.dropped_per_epoch == 1 + 1
    seen = Counter(i for r in per_rank for b in r for i in b)
    assert set(seen.values()) == {1} and len(seen) == len(lengths) - 2
    assert [len(b) for b in per_rank[0][-2:]] == [2, 3]  # the tails: 5 -> 2 per rank, 7 -> 3 per rank


def test_one_modality_only_and_bad_lengths():
    per_rank = rank_batches(np.arange(1, 11), 4, 1)
    assert sorted(i for b in per_rank[0] for i in b) == list(range(10))
    with pytest.raises(ValueError, match="non-zero"):
        ModalityLengthBatchSampler([3, 0, -2], 2)


def test_modality_lengths_count_words_with_the_images_sign():
    samples = [Sample("/x.png", Prompt("<image>a cat on a mat\n", ((7, 22),))), Sample(None, Prompt("hi there", ()))]
    assert modality_lengths(samples) == [5, -2]


@pytest.mark.slow
def test_a_grouped_run_trains_and_resumes_exactly(tmp_path, digit_llm_dir, clip_moe_dir, grids_dir, monkeypatch,
                                                  capsys):
    """Stage 2 on image and text-only records with --group_by_modality_length True: every micro-batch is one
    modality, and a run interrupted after its checkpoint ends with the weights of an uninterrupted one."""
    import json

    import torch
    from safetensors.torch import load_file

    from mllm_bridge.train import loop
    from mllm_bridge.train.cli import main

    records = json.loads((grids_dir / "train_qa.json").read_text())
    text_only = [{"id": f"t{i}", "conversations": [{"from": "human", "value": "Say a digit."},
                                                   {"from": "gpt", "value": str(i % 10)}]} for i in range(32)]
    (tmp_path / "mixed.json").write_text(json.dumps(records + text_only))

    def argv(out):
        values = dict(model_name_or_path=digit_llm_dir, vision_tower=clip_moe_dir, data_path=tmp_path / "mixed.json",
                      image_folder=grids_dir, output_dir=out, per_device_train_batch_size=8, max_steps=4,
                      learning_rate=1e-3, save_steps=2, report_to="none", seed=0, group_by_modality_length=True)
        return ["finetune", *[item for k, v in values.items() for item in (f"--{k}", str(v))]]

    modalities = []
    real_loss, real_step = loop.LlavaTrainer._loss, loop.LlavaTrainer._optimizer_step

    def observed(self, batch):
        assert isinstance(self.sampler, ModalityLengthBatchSampler)
        has_image = batch["images"].flatten(1).abs().sum(1) > 0  # text-only samples carry a black image
        modalities.append(set(has_image.tolist()))
        return real_loss(self, batch)

    def interrupted(self, batches):
        if self.step == 3:
            raise KeyboardInterrupt
        return real_step(self, batches)

    monkeypatch.setattr(loop.LlavaTrainer, "_loss", observed)
    assert main(argv(tmp_path / "llava-whole")) == 0
    assert len(modalities) == 4 and all(len(m) == 1 for m in modalities)
    monkeypatch.setattr(loop.LlavaTrainer, "_optimizer_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(argv(tmp_path / "llava-resumed"))
    monkeypatch.setattr(loop.LlavaTrainer, "_optimizer_step", real_step)
    assert main(argv(tmp_path / "llava-resumed")) == 0
    assert "resumed from" in capsys.readouterr().out
    whole, resumed = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("llava-whole", "llava-resumed"))
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
