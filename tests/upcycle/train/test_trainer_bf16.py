"""One DMU training step in bf16 (--precision bf16, the GPU recipe) on the CPU: finite losses and the experts'
matmuls really in bf16, forward and backward, for both of DMU's trainable sets (stage FFNs, routers)."""

import json
import math

import pytest
import torch
from conftest import MatmulLog, dataset_for

from encoder.loading import load_clip
from upcycle.recipes.sparse import sparse_upcycle
from upcycle.train import ContrastiveTrainer, TrainConfig


@pytest.mark.parametrize("trainable", ["ffn", "router"])
def test_one_bf16_step_of_each_dmu_phase_has_finite_loss_and_bf16_expert_matmuls(trainable, base_clip_dir,
                                                                                 grids_dir, tmp_path):
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no bf16 support")
    loaded = load_clip(base_clip_dir)
    model = sparse_upcycle(loaded.model, num_experts=2, top_k=1, moe_layers="all")
    data = dataset_for(loaded, grids_dir / "train.json")
    cfg = TrainConfig(trainable=trainable, max_steps=1, batch_size=16, lr=1e-3, warmup_ratio=0.0,
                      precision="bf16", checkpoint_every=100)
    trainer = ContrastiveTrainer(model, data, data.collate, cfg, tmp_path / "work")
    log = MatmulLog()
    handles = log.watch(model)
    with log:
        trainer.train(resume=False)
    for h in handles:
        h.remove()
    expert_calls = [dtypes for _, inside, dtypes in log.calls if inside]
    assert expert_calls and all(dtypes == {torch.bfloat16} for dtypes in expert_calls), expert_calls[:5]
    backward = [dtypes for op, inside, dtypes in log.calls if not inside and dtypes == {torch.bfloat16}]
    assert backward, "no bf16 matmul outside the experts' forward (attention / backward ran in fp32?)"
    rows = [json.loads(line) for line in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(math.isfinite(r["loss"]) for r in rows)
