"""The lmms-eval model `llava_clipmoe`, driven in-process with lmms-eval's own request objects."""

import json
import shutil

import pytest
import torch
from lmms_eval.api.instance import Instance

from encoder.utils.errors import UserError
from mllm_bridge.lmms.model import LlavaCLIPMoE
from mllm_bridge.lmms.requests import GenerationSettings, build_prompt, truncate_at_stop
from mllm_bridge.lmms.tasks.digit_grids import utils

TASK, SPLIT = "digit_grids_qa", "test"
GREEDY = {"max_new_tokens": 8, "temperature": 0, "top_p": 1.0, "num_beams": 1, "do_sample": False}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on shared cores its spin-waits can cost 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def docs(digit_task_dir, tmp_path_factory):
    from datasets import load_dataset

    cache = tmp_path_factory.mktemp("hf-datasets")
    files = {SPLIT: str(digit_task_dir / "digit_grids.parquet")}
    data = load_dataset("parquet", data_files=files, cache_dir=str(cache))
    return [data[SPLIT][i] for i in range(12)]


def model(docs, pretrained, batch_size=1, **kwargs) -> LlavaCLIPMoE:
    lm = LlavaCLIPMoE(pretrained=str(pretrained), device="cpu", batch_size=batch_size, **kwargs)
    lm.task_dict = {TASK: {SPLIT: docs}}
    return lm


def request(kind, context, second, doc_id):
    return Instance(kind, (context, second, utils.doc_to_visual, doc_id, TASK, SPLIT), idx=0,
                    metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})


def questions(docs, gen_kwargs=GREEDY, count=None):
    """Generation requests; some questions are padded out so that a batch mixes prompt lengths."""
    docs = docs[:count] if count else docs
    return [request("generate_until", utils.doc_to_text(d) + " Look closely." * (i % 3), gen_kwargs, i)
            for i, d in enumerate(docs)]


def test_batched_greedy_answers_equal_batch_size_1(lmms_checkpoints, docs):
    requests = questions(docs)
    answers = {bs: model(docs, lmms_checkpoints.full, bs).generate_until(requests) for bs in (1, 2, 5)}
    assert answers[1] == answers[2] == answers[5]
    assert len(set(answers[1])) > 1  # answers depend on the input, so equal lists are a real check

    lm = model(docs, lmms_checkpoints.full)
    lengths = {len(lm._encode(build_prompt(lm.template, r.args[0], 1))) for r in requests}
    assert len(lengths) > 1  # batches really mix lengths: left padding and masks are exercised


def test_until_cuts_the_answer_at_the_first_stop_string(lmms_checkpoints, docs):
    lm = model(docs, lmms_checkpoints.full, batch_size=3)
    free = lm.generate_until(questions(docs, count=3))
    stop = next(c for c in free[0][len(free[0]) // 2:] if not c.isspace())
    cut = lm.generate_until(questions(docs, {**GREEDY, "until": [stop]}, count=3))
    assert cut[0] == free[0][: free[0].index(stop)].strip()
    assert cut[1:] == [truncate_at_stop(a, [stop]).strip() for a in free[1:]]


def test_gen_kwargs_resolve_to_greedy_or_sampling():
    greedy = GenerationSettings.from_gen_kwargs({"temperature": 0, "top_p": 1.0, "until": "\n\n"}, 128)
    assert greedy.generate_kwargs() == {"max_new_tokens": 128, "num_beams": 1, "do_sample": False}
    assert greedy.until == ("\n\n",)
    sampled = GenerationSettings.from_gen_kwargs({"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 5}, 128)
    assert sampled.generate_kwargs() == {"max_new_tokens": 5, "num_beams": 1, "do_sample": True,
                                         "temperature": 0.7, "top_p": 0.9}
    assert truncate_at_stop("3\n\nUSER: next", ["USER:", "\n\n"]) == "3"
    with pytest.raises(UserError, match="until"):
        GenerationSettings.from_gen_kwargs({"until": 3}, 128)


def test_loglikelihood_is_the_summed_nll_of_the_continuation(lmms_checkpoints, docs):
    lm = model(docs, lmms_checkpoints.full, batch_size=4)
    context = utils.doc_to_text(docs[0])
    requests = [request("loglikelihood", context, f" {d}", 0) for d in range(10)]
    scores = [r.text for r in lm.loglikelihood(requests)]  # lmms-eval unwraps GenerationResult.text

    prompt = build_prompt(lm.template, context, 1)
    pixels, sizes = lm._pixels([utils.doc_to_visual(docs[0])])
    for digit, (nll, _) in enumerate(scores):
        ids = lm._encode(prompt + f" {digit}")
        labels = ids.clone()
        labels[: len(lm._encode(prompt))] = -100
        with torch.no_grad():
            loss = lm.model(input_ids=ids[None], labels=labels[None], images=pixels, image_sizes=sizes).loss
        assert nll == pytest.approx(loss.item() * int((labels != -100).sum()), rel=1e-4)

    one_by_one = [r.text for r in model(docs, lmms_checkpoints.full).loglikelihood(requests)]
    assert [s for s, _ in one_by_one] == pytest.approx([s for s, _ in scores], rel=1e-4)
    assert len({round(s, 3) for s, _ in scores}) > 1


def test_stage1_checkpoint_over_model_base_answers_like_the_full_checkpoint(lmms_checkpoints, docs):
    requests = questions(docs, count=4)
    full = model(docs, lmms_checkpoints.full, 2).generate_until(requests)
    stage1 = model(docs, lmms_checkpoints.stage1, 2, model_base=str(lmms_checkpoints.llm)).generate_until(requests)
    assert stage1 == full
    with pytest.raises(UserError, match="mm_projector.bin .*model_base=LLM_DIR"):
        model(docs, lmms_checkpoints.stage1)


def test_vision_tower_override_leaves_config_json_alone(lmms_checkpoints, docs, dense_clip_dir):
    before = (lmms_checkpoints.full / "config.json").read_text()
    lm = model(docs, lmms_checkpoints.full, vision_tower=str(dense_clip_dir))
    assert type(lm.model.get_vision_tower().vision_tower).__name__ == "CLIPVisionModel"
    assert lm.usage is None  # a dense tower has no experts to count
    assert lm.generate_until(questions(docs, count=2))
    assert (lmms_checkpoints.full / "config.json").read_text() == before


def test_bad_input_is_one_clear_line(lmms_checkpoints, docs, tmp_path):
    gone_tower = tmp_path / "llava-gone-tower"
    gone_tower.mkdir()
    config = json.loads((lmms_checkpoints.full / "config.json").read_text())
    (gone_tower / "config.json").write_text(json.dumps({**config, "mm_vision_tower": str(tmp_path / "gone")}))
    full = lmms_checkpoints.full
    cases = [
        ({"pretrained": tmp_path / "nope"}, "checkpoint .*nope does not exist"),
        ({"pretrained": "nobody/llava-nothing"}, "nobody/llava-nothing is neither a directory nor a hub repo"),
        ({"pretrained": gone_tower}, "gone is neither a directory nor a hub id.*vision_tower=DIR"),
        ({"pretrained": full, "vision_tower": str(tmp_path / "gone")}, "vision_tower=.*gone is not a directory"),
        ({"pretrained": full, "conv_template": "nope"}, "conv_template=nope is not one of"),
        ({"pretrained": full, "dtype": "fp8"}, "dtype=fp8 not understood"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message) as err:
            model(docs, **kwargs)
        assert "\n" not in str(err.value)


def test_expert_usage_counts_every_moe_layer(lmms_checkpoints, docs, tmp_path):
    usage_file = tmp_path / "usage.json"
    lm = model(docs, lmms_checkpoints.full, 3, expert_usage=str(usage_file))
    lm.generate_until(questions(docs, count=6))
    lm.clean()  # what lmms-eval calls once every request is answered
    usage = json.loads(usage_file.read_text())
    assert usage["moe_layers"] == [0, 1, 2, 3] and usage["top_k"] == 2 and usage["num_experts"] == 4
    assert usage["all"]["images"] == 6 and usage["tasks"][TASK] == usage["all"]
    for layer in usage["all"]["layers"]:
        assert layer["tokens"] == 6 * 17  # 16 patches + CLS per image, every MoE layer
        assert sum(layer["choices"]) == 2 * layer["tokens"]
        assert sum(layer["expert_fraction"]) == pytest.approx(1.0)
    assert usage["pretrained"] == str(lmms_checkpoints.full)


def test_stage1_directory_copy_without_weights_needs_its_base(lmms_checkpoints, docs, tmp_path):
    # A stage-1 output whose projector file went missing has nothing to load: say so instead of loading noise.
    broken = tmp_path / "llava-broken"
    shutil.copytree(lmms_checkpoints.stage1, broken)
    (broken / "mm_projector.bin").unlink()
    with pytest.raises(UserError, match="no model weights"):
        model(docs, broken)


# LLaVA-1.6 checkpoints: anyres crops, so images of different shapes get different crop and token counts.

SHAPES = [(32, 32), (64, 32), (32, 64), (80, 40), (20, 70)]


@pytest.fixture(scope="module")
def anyres_checkpoint(tmp_path_factory, clip_moe_dir, llama_tokenizer):
    """A tiny CLIP-MoE LLaVA with image_aspect_ratio anyres, spatial_unpad (a learned image_newline) and the
    pinpoints in LLaVA-NeXT's range form (2x2 crops of the tower's 32 pixels at most)."""
    from mllm_bridge.embedded.tiny_lm import tiny_llama_config
    from mllm_bridge.llava.model import build_llava_model

    out = tmp_path_factory.mktemp("lmms-anyres") / "llava-anyres"
    config = tiny_llama_config(llama_tokenizer, hidden_size=32)
    config.initializer_range = 0.3
    torch.manual_seed(0)
    llava = build_llava_model(config, clip_moe_dir, patch_merge_type="spatial_unpad")
    llava.config.image_aspect_ratio = "anyres"
    llava.config.image_grid_pinpoints = "(1x1),...,(2x2)"
    assert llava.get_model().image_newline.shape == (32,)
    state = {k: v for k, v in llava.state_dict().items() if ".vision_tower." not in k}
    llava.save_pretrained(out, state_dict=state)
    llama_tokenizer.save_pretrained(out)
    return out


def shaped_visual(doc):
    """The doc's grid resized to the shape its question index picks (`_shape`, set by `shaped`)."""
    return [image.resize(tuple(doc["_shape"])) for image in utils.doc_to_visual(doc)]


def shaped(docs):
    return [dict(d, _shape=SHAPES[i % len(SHAPES)]) for i, d in enumerate(docs)]


def shaped_request(kind, context, second, doc_id):
    return Instance(kind, (context, second, shaped_visual, doc_id, TASK, SPLIT), idx=0,
                    metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})


def test_anyres_batches_of_different_crop_counts_answer_as_batch_size_1(anyres_checkpoint, docs):
    docs = shaped(docs)
    lm = model(docs, anyres_checkpoint, 5)
    pixels, sizes = lm._pixels([shaped_visual(d) for d in docs[:5]])
    assert isinstance(pixels, list) and len({p.shape[0] for p in pixels}) > 1  # crop counts differ in the batch
    assert len({lm.layout.count(s) for s in sizes}) > 1
    assert lm.model.config.image_grid_pinpoints == [[32, 32], [32, 64], [64, 32], [64, 64]]

    requests = [shaped_request("generate_until", utils.doc_to_text(d) + " Look closely." * (i % 2), GREEDY, i)
                for i, d in enumerate(docs[:10])]
    answers = {bs: model(docs, anyres_checkpoint, bs).generate_until(requests) for bs in (1, 3, 5)}
    assert answers[1] == answers[3] == answers[5]
    assert len(set(answers[1])) > 1

    scored = [shaped_request("loglikelihood", utils.doc_to_text(docs[i]), f" {d}", i) for i in range(5) for d in (3, 7)]
    batched = [r.text for r in model(docs, anyres_checkpoint, 4).loglikelihood(scored)]
    one_by_one = [r.text for r in model(docs, anyres_checkpoint, 1).loglikelihood(scored)]
    assert [s for s, _ in batched] == pytest.approx([s for s, _ in one_by_one], rel=1e-4)
    assert [g for _, g in batched] == [g for _, g in one_by_one]
    assert len({round(s, 3) for s, _ in batched}) > 1


def test_anyres_checkpoint_without_pinpoints_is_one_line(anyres_checkpoint, docs, tmp_path):
    broken = tmp_path / "llava-anyres-no-pinpoints"
    shutil.copytree(anyres_checkpoint, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "image_grid_pinpoints": None}))
    with pytest.raises(UserError, match="anyres needs image_grid_pinpoints") as err:
        model(docs, broken)
    assert "\n" not in str(err.value)
