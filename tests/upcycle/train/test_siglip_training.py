"""Training a SigLIP (dense or MoE) with its own loss: the pairwise sigmoid loss, judged by transformers'
`SiglipModel(return_loss=True)`, with `logit_bias` trained; the CLIP loss asked for a SigLIP refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from encoder.siglip import sparse_upcycle_siglip
from encoder.utils.errors import UserError
from upcycle.cli import main
from upcycle.train import ContrastiveTrainer, TrainConfig, select_trainable, sigmoid_loss_for
from upcycle.train.trainer import ContrastiveHead


def config(**kwargs) -> TrainConfig:
    return TrainConfig(**{"batch_size": 8, "max_steps": 1, "lr": 1e-3, "warmup_ratio": 0.0, "weight_decay": 0.0,
                          "checkpoint_every": 1000, **kwargs})


def first_batch(dataset, n: int = 8) -> dict:
    return dataset.collate([dataset[i] for i in range(n)])


def siglip_loss(model, batch) -> torch.Tensor:
    """transformers' own loss of `model` (a SiglipModel) on `batch`, fed as the trainer feeds it."""
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], return_loss=True).loss


def test_siglip_batches_are_fixed_length_without_a_mask(siglip_dataset):
    batch = first_batch(siglip_dataset)
    assert batch["input_ids"].shape == (8, 24) and "attention_mask" not in batch
    lengths = {len(c.split()) for c in batch["captions"]}
    assert max(lengths) < 20  # the captions are shorter than the fixed length: the padding is real


def test_trainer_loss_equals_siglip_models_own(make_tiny_siglip, siglip_dataset, tmp_path):
    model = make_tiny_siglip()
    batch = first_batch(siglip_dataset)
    reference = siglip_loss(model, batch)
    trainer = ContrastiveTrainer(model, siglip_dataset, siglip_dataset.collate, config(), tmp_path / "work")
    assert trainer.sigmoid
    with torch.no_grad():
        loss, parts = trainer._forward(batch)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    assert parts["load_balance"] == parts["z_loss"] == 0.0  # a dense SigLIP: no router


def test_siglip_moe_trains_with_the_dense_models_sigmoid_loss_plus_its_aux_losses(make_tiny_siglip, siglip_dataset,
                                                                                 tmp_path):
    dense = make_tiny_siglip()
    moe = sparse_upcycle_siglip(dense, vision_moe=dict(num_experts=4, top_k=2, moe_layers=[0, 1]),
                                text_moe=dict(num_experts=2, top_k=1, moe_layers=[1]))
    batch = first_batch(siglip_dataset)
    trainer = ContrastiveTrainer(moe, siglip_dataset, siglip_dataset.collate, config(), tmp_path / "work")
    with torch.no_grad():
        loss, parts = trainer._forward(batch)
    # Upcycling preserves the function, so the contrastive part is the dense SigLIP's own loss
    torch.testing.assert_close(torch.tensor(parts["contrastive"]), siglip_loss(dense, batch), rtol=1e-5, atol=1e-5)
    assert parts["load_balance"] > 0 and parts["z_loss"] > 0
    coef = moe.config.vision_config
    expected = parts["contrastive"] + coef.aux_loss_coef * parts["load_balance"] + coef.router_z_loss_coef * parts["z_loss"]
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_training_lowers_the_sigmoid_loss_and_trains_logit_bias(make_tiny_siglip, siglip_dataset, tmp_path):
    model = make_tiny_siglip()
    batch = first_batch(siglip_dataset, 16)
    before, bias_before = siglip_loss(model, batch), model.logit_bias.item()
    trainer = ContrastiveTrainer(model, siglip_dataset, siglip_dataset.collate, config(batch_size=16, max_steps=6),
                                 tmp_path / "work")
    assert "logit_bias" in trainer.trainable and "logit_scale" in trainer.trainable
    trained = trainer.train(resume=False)
    assert trained.logit_bias.item() != bias_before
    assert siglip_loss(trained, batch) < before
    saved = load_file(str(tmp_path / "work" / "step-6" / "trainable.safetensors"))
    assert saved["logit_bias"].shape == saved["logit_scale"].shape == (1,)  # the model's own shapes
    torch.testing.assert_close(saved["logit_bias"], trained.logit_bias.detach())


def test_a_fixed_logit_scale_freezes_the_scale_but_the_bias_still_trains(make_tiny_siglip, siglip_dataset, tmp_path):
    model = make_tiny_siglip()
    scale = model.logit_scale.detach().clone()
    trainer = ContrastiveTrainer(model, siglip_dataset, siglip_dataset.collate,
                                 config(logit_scale=10.0, max_steps=2), tmp_path / "work")
    assert "logit_scale" not in trainer.trainable and "logit_bias" in trainer.trainable
    trained = trainer.train(resume=False)
    assert torch.equal(trained.logit_scale, scale) and trained.logit_bias.item() != -1.5


def test_ffn_training_leaves_the_attention_pooling_heads_mlp_alone(make_tiny_siglip):
    model = make_tiny_siglip()
    names = select_trainable(model, "ffn")
    assert names and all(".encoder.layers." in n and ".mlp." in n for n in names)
    assert not any(n.startswith("vision_model.head.") for n in names)


def test_the_sharded_heads_own_logit_scale_goes_back_in_the_models_shape(make_tiny_siglip):
    model = make_tiny_siglip()
    head = ContrastiveHead(model, own_logit_scale=True)
    weights = ContrastiveHead.clip_weights(head.state_dict(), (1,))
    assert weights["logit_scale"].shape == (1,) and "logit_bias" in weights


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"loss": "clip"}, "the CLIP loss asked for a SigLIP model"),
    ({"label_smoothing": 0.1}, "has no label smoothing"),
])
def test_a_loss_a_siglip_cannot_train_with_is_refused_before_anything_is_written(make_tiny_siglip, siglip_dataset,
                                                                                tmp_path, kwargs, words):
    with pytest.raises(UserError, match=words):
        ContrastiveTrainer(make_tiny_siglip(), siglip_dataset, siglip_dataset.collate, config(**kwargs),
                           tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_the_sigmoid_loss_asked_for_a_clip_is_refused(dense_clip):
    with pytest.raises(UserError, match="the sigmoid loss asked for a CLIP model"):
        sigmoid_loss_for(config(loss="sigmoid"), dense_clip.config)
    assert sigmoid_loss_for(config(), dense_clip.config) is False
    assert sigmoid_loss_for(config(loss="clip"), dense_clip.config) is False


def test_upcycle_train_refuses_the_clip_loss_for_a_siglip_directory_in_one_line(siglip_dir, grids_dir, tmp_path,
                                                                               capsys):
    out = tmp_path / "out"
    code = main(["train", "--model", str(siglip_dir), "--train-data", str(grids_dir / "train.json"),
                 "--out", str(out), "--loss", "clip", "--batch-size", "8", "--max-steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "the CLIP loss asked for a SigLIP model" in err[0]
    assert not out.exists() and not (tmp_path / "out.train-work").exists()


def test_a_siglip2_is_refused_in_one_line_before_anything_is_written(siglip_dataset, tmp_path):
    """SigLIP2's naflex images (patch sequences with a mask) are more than these datasets produce: refused, not fed
    wrongly."""
    from transformers import Siglip2Config, Siglip2Model

    from upcycle.eval.embedding import encode_pairs

    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    model = Siglip2Model(Siglip2Config(text_config=dict(tower, vocab_size=100), vision_config=tower))
    with pytest.raises(UserError, match="SigLIP2 model takes variable-resolution patch sequences"):
        ContrastiveTrainer(model, siglip_dataset, siglip_dataset.collate, config(), tmp_path / "work")
    assert not (tmp_path / "work").exists()
    with pytest.raises(UserError, match="SigLIP2"):
        encode_pairs(model, [], None, object())


def test_a_checkpoint_recorded_before_the_loss_setting_existed_resumes(make_tiny_siglip, siglip_dataset, tmp_path):
    import json

    ContrastiveTrainer(make_tiny_siglip(), siglip_dataset, siglip_dataset.collate,
                       config(max_steps=2, checkpoint_every=1), tmp_path / "work").train(resume=False)
    state_file = tmp_path / "work" / "step-2" / "state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["loss"]  # what runs made before --loss recorded: they trained with the family's loss
    state_file.write_text(json.dumps(state))
    resumed = ContrastiveTrainer(make_tiny_siglip(), siglip_dataset, siglip_dataset.collate,
                                 config(max_steps=2, checkpoint_every=1), tmp_path / "work")
    resumed.train(resume=True)  # the same settings: accepted, and the run is already complete
    assert resumed.step == 2
    with pytest.raises(UserError, match="loss: family -> sigmoid"):
        ContrastiveTrainer(make_tiny_siglip(), siglip_dataset, siglip_dataset.collate,
                           config(max_steps=2, checkpoint_every=1, loss="sigmoid"), tmp_path / "work").train()
