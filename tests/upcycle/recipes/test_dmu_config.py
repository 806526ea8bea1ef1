"""DMU's settings: each training phase gets its TrainConfig from the one DMUConfig, not from a hand-kept copy."""

from __future__ import annotations

from dataclasses import fields, replace

from upcycle.recipes.dmu.config import DMUConfig
from upcycle.train import TrainConfig


def test_each_phase_trains_with_dmus_own_settings():
    cfg = DMUConfig(base="b", train_data="d", out="o", batch_size=8, lr=3e-4, router_lr=2e-6, weight_decay=0.1,
                    warmup_ratio=0.2, label_smoothing=0.05, logit_scale=50.0, aux_loss_coef=0.02, z_loss_coef=0.004,
                    checkpoint_every=7, num_workers=1, precision="fp32", seed=3, stage_epochs=2.0, router_epochs=0.5,
                    stage_max_steps=11, router_max_steps=5)
    common = dict(batch_size=8, weight_decay=0.1, warmup_ratio=0.2, label_smoothing=0.05, logit_scale=50.0,
                  checkpoint_every=7, num_workers=1, precision="fp32", seed=3,
                  aux_loss_coef=None, z_loss_coef=None)  # the model's: DMU wrote its own into the CLIP-MoE config
    assert cfg.train_config("ffn", "MCL stage 1") == TrainConfig(trainable="ffn", lr=3e-4, epochs=2.0, max_steps=11,
                                                                 desc="MCL stage 1", **common)
    assert cfg.train_config("router", "router training") == TrainConfig(trainable="router", lr=2e-6, epochs=0.5,
                                                                        max_steps=5, desc="router training", **common)


def test_every_training_setting_dmu_has_reaches_its_phases():
    """A TrainConfig setting added to DMUConfig later reaches both phases without another copy to keep."""
    cfg = DMUConfig(base="b", train_data="d", out="o")
    own = {"trainable", "lr", "epochs", "max_steps", "aux_loss_coef", "z_loss_coef", "desc"}  # set per phase
    shared = {f.name for f in fields(DMUConfig)} & {f.name for f in fields(TrainConfig)} - own
    assert shared >= {"batch_size", "checkpoint_every", "seed", "precision"}
    for phase in ("ffn", "router"):
        train = cfg.train_config(phase, phase)
        assert {name: getattr(train, name) for name in shared} == {name: getattr(cfg, name) for name in shared}


def test_a_dmu_resume_may_change_what_a_training_resume_may_and_no_more():
    """The settings a DMU --resume may change are its output paths and TrainConfig's NOT_SHAPING ones."""
    cfg = DMUConfig(base="b", train_data="d", out="o")
    moved = replace(cfg, out="o2", work_dir="w", overwrite=True, checkpoint_every=3, num_workers=2)
    assert moved.fingerprint() == cfg.fingerprint()
    assert not {"checkpoint_every", "num_workers", "out"} & set(cfg.fingerprint())
    assert replace(cfg, batch_size=8).fingerprint() != cfg.fingerprint()
    assert replace(cfg, seed=1).fingerprint() != cfg.fingerprint()
