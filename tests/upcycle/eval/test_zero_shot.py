"""Zero-shot classification: top-k accuracy on constructed scores and CLIP's prompt ensembling with a tiny CLIP."""

import pytest
import torch
import torch.nn.functional as F

from encoder.loading import load_clip
from encoder.utils.errors import UserError
from upcycle.eval.embedding import encode_texts
from upcycle.eval.zero_shot import check_templates, class_embeddings, topk_accuracy


@pytest.fixture(scope="module")
def dense(base_clip_dir):  # noqa: F811
    return load_clip(base_clip_dir)


def test_topk_accuracy_on_constructed_scores():
    classes = torch.eye(6)
    images = torch.tensor([[1.0, 0.5, 0.4, 0.3, 0.2, 0.1],   # label 0: ranked first
                           [0.9, 0.8, 0.1, 0.1, 0.1, 0.1],   # label 1: ranked second
                           [0.6, 0.5, 0.4, 0.3, 0.2, 0.1]])  # label 5: ranked last
    acc = topk_accuracy(images, classes, [0, 1, 5])
    assert acc == {"top1": pytest.approx(100 / 3), "top5": pytest.approx(200 / 3)}
    assert topk_accuracy(images[:, :3], classes[:3, :3], [0, 1, 2])["top5"] == 100.0  # k capped at 3 classes
    assert topk_accuracy(torch.ones(2, 6), classes, [0, 3]) == {"top1": 0.0, "top5": 0.0}  # all tied: no hit


def test_class_embeddings_average_the_normalised_template_embeddings(dense):
    names = ["top left 3", "bottom right 7"]
    single = [class_embeddings(dense.model, dense.tokenizer, names, [t]) for t in ("{}", "{} , top right")]
    assert torch.allclose(single[0], encode_texts(dense.model, dense.tokenizer, names), atol=1e-6)
    both = class_embeddings(dense.model, dense.tokenizer, names, ["{}", "{} , top right"])
    assert torch.allclose(both, F.normalize(single[0] + single[1], dim=-1), atol=1e-6)
    assert not torch.allclose(single[0], single[1], atol=1e-3)  # the templates do change the prompt
    with pytest.raises(UserError, match="no {}"):
        check_templates(["a photo of a digit"])
