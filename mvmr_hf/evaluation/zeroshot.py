"""Zero-shot classification through a CLIP-style teacher's text tower.

Cosine similarity between image embeddings and the text embeddings of ``"a photo of a {label}"``
(:func:`text_embeddings`); a student reaches the teacher's embedding space through its alignment
head (:mod:`mvmr_hf.release.align`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers import AutoModel, AutoTokenizer

from mvmr_hf.errors import ConfigError
from mvmr_hf.evaluation.features import (
    FeatureSet,
)
from mvmr_hf.evaluation.probe import (
    Accuracy,
    _check_features,
    topk_accuracy,
)
from mvmr_hf.evaluation.results import ProtocolResult

PROMPT = "a photo of a {}"


def zero_shot_scores(image_embeddings: Tensor, class_embeddings: Tensor) -> Tensor:
    """Cosine similarities (N, C) between image embeddings (N, E) and class text embeddings (C, E)."""
    if class_embeddings.ndim != 2 or class_embeddings.shape[1] != image_embeddings.shape[1]:
        raise ConfigError(
            f"class embeddings {tuple(class_embeddings.shape)} do not match image embeddings "
            f"{tuple(image_embeddings.shape)}: use the text tower of the same teacher."
        )
    images = nn.functional.normalize(image_embeddings.float(), dim=1)
    return images @ nn.functional.normalize(class_embeddings.float(), dim=1).to(images.device).T


def zero_shot(image_embeddings: Tensor, labels: Tensor, class_embeddings: Tensor) -> Accuracy:
    """Zero-shot accuracy: each image gets the class whose text embedding has the highest cosine similarity.

    ``image_embeddings`` (N, E) are in the text tower's space (a CLIP-style teacher's image
    embedding, or a student's features through its alignment head); ``class_embeddings`` (C, E).
    """
    _check_features(image_embeddings, labels, "image")
    return topk_accuracy(zero_shot_scores(image_embeddings, class_embeddings), labels)


def text_embeddings(
    model_name_or_path: str, names: Sequence[str], *, device: str | torch.device = "cpu"
) -> Tensor:
    """``(C, E)`` text embeddings of ``"a photo of a {name}"`` from a CLIP-style model's text tower."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
        model = AutoModel.from_pretrained(model_name_or_path).eval().to(device)
    except (OSError, ValueError) as error:  # ValueError: a folder with no tokenizer transformers can build
        raise ConfigError(
            f"cannot load the text tower and tokenizer of {model_name_or_path} ({type(error).__name__}): "
            "zero-shot needs a CLIP-style model with its tokenizer."
        ) from None
    if not hasattr(model, "get_text_features"):
        raise ConfigError(f"{model_name_or_path} has no text tower: zero-shot needs a CLIP-style model.")
    tokens = tokenizer(
        [PROMPT.format(name) for name in names],
        padding="max_length",
        truncation=True,
        max_length=model.config.text_config.max_position_embeddings,
        return_tensors="pt",
    ).to(device)
    with torch.no_grad():
        output = model.get_text_features(**tokens)
    return getattr(output, "pooler_output", output).float().cpu()


def _aligned_zero_shot(
    alignment: nn.Module, test: FeatureSet, teacher: Tensor, classes: Tensor
) -> ProtocolResult:
    """Zero-shot through a student's alignment head, with how close it comes to its teacher.

    The detail gives the teacher's own zero-shot top-1 on the same images and the share of images
    on which student and teacher predict the same class.
    """
    with torch.no_grad():
        student = zero_shot_scores(alignment.to(test.features.device)(test.features), classes)
    reference = zero_shot_scores(teacher.to(test.features.device), classes)
    accuracy, teacher_accuracy = topk_accuracy(student, test.labels), topk_accuracy(reference, test.labels)
    agreement = 100.0 * (student.argmax(1) == reference.argmax(1)).float().mean().item()
    detail = f"via alignment head; teacher top-1 {teacher_accuracy.top1:.2f}, agreement {agreement:.2f}%"
    return ProtocolResult("zero-shot", accuracy.top1, accuracy.top5, detail)
