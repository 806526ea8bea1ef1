"""What a bare eval-lmms evaluates: the embedded training run's checkpoints, each with both towers."""

from mllm_bridge.embedded.evaluation import default_plan
from mllm_bridge.embedded.training import FINETUNE_OUTPUT, PRETRAIN_OUTPUT


def test_embedded_default_plans_both_stages_with_both_towers(lmms_checkpoints, grids_dir, clip_moe_dir,
                                                             dense_clip_dir, tmp_path):
    root = tmp_path / "llava-default"  # what the embedded training run leaves behind
    root.mkdir()
    for name, target in [("digit-grids", grids_dir), ("clip-moe-vision", clip_moe_dir), ("clip-base", dense_clip_dir),
                         ("llm", lmms_checkpoints.llm), (FINETUNE_OUTPUT, lmms_checkpoints.full),
                         (PRETRAIN_OUTPUT, lmms_checkpoints.stage1)]:
        (root / name).symlink_to(target)
    plan = default_plan(root)
    assert [c.name for c in plan.checkpoints] == ["stage2-clip-moe", "stage2-dense-tower", "stage1-clip-moe",
                                                  "stage1-dense-tower"]
    stage1_dense = plan.checkpoints[3]
    assert stage1_dense.args == {"model_base": str(root / "llm"), "conv_template": "plain",
                                 "vision_tower": str(root / "clip-base")}
    assert plan.tasks == ["digit_grids_qa", "digit_grids_mc"]
    assert (plan.include_path / "digit_grids_qa.yaml").is_file()

    for name in (FINETUNE_OUTPUT, PRETRAIN_OUTPUT):
        (root / name).unlink()
    plan = default_plan(root)  # before any training: one untrained checkpoint from the same parts
    assert [c.name for c in plan.checkpoints] == ["untrained-clip-moe", "untrained-dense-tower"]
    assert (root / "llava-untrained" / "config.json").is_file()
