"""The model card of a release: Hub metadata, ``model-index`` results and the body from the template.

The card is always rendered whole from what the release folder holds (``config.json``,
``training_args.json``, ``run_info.json``, the head descriptions) plus the evaluation results,
so re-rendering after an evaluation or an alignment never drifts from the folder's content.
Results live in the card's ``model-index`` (``huggingface_hub.EvalResult``), which is where the
Hub reads them; :func:`read_results` gets them back for merging.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from mvmr_hf.config import parse_weights, teacher_specs
from mvmr_hf.data.augment import AUGMENTATIONS, DEFAULT_CROP_SCALE, parse_augmentations, parse_crop_scale
from mvmr_hf.utils import is_hub_id, is_local_path

TASK_TYPE = "image-classification"
TASK_NAME = "Image Classification"
PIPELINE_TAG = "image-feature-extraction"
# The training CLI's names of the weights of eq. 7-9.
LOSS_WEIGHT_SYMBOLS = {
    "invariance_weight": "λ",
    "variance_weight": "μ",
    "view_weight": "α",
    "representation_weights": "β_k",
}
TEMPLATES = Path(__file__).parent / "templates"  # package data (pyproject.toml), beside this module
TEMPLATE = TEMPLATES / "model_card.md"


@dataclass
class CardInfo:
    """Facts about a run that the card reports; the release keeps them in ``run_info.json``.

    Attributes:
        step: optimizer steps taken when the release was written.
        hardware: e.g. ``"8x NVIDIA H100 80GB"``.
        training_seconds: wall-clock training time.
        command: the exact command line that reproduces the run.
        repo_id: the Hub id the release is (or will be) pushed to, used in the loading snippets.
        license: an SPDX-style Hub licence id.
        teachers: each teacher as the run loaded it: ``name``, ``model``, ``output`` (the resolved
            kind), ``input_size`` (the side its processor fed the model) and ``weight`` (β).
    """

    step: int | None = None
    hardware: str | None = None
    training_seconds: float | None = None
    command: str | None = None
    repo_id: str | None = None
    license: str = "apache-2.0"
    teachers: list[dict[str, Any]] | None = None


@dataclass
class BackboneInfo:
    """What the card says about the exported timm backbone."""

    architecture: str
    num_params: int
    num_features: int
    image_size: int


def hub_id_or_none(name: str | None) -> str | None:
    """``name`` when it is a Hub repository id, ``None`` for local paths and non-ids (not linkable)."""
    return name if name and not is_local_path(name) and is_hub_id(name) else None


def read_results(readme: str | Path) -> list[EvalResult]:
    """The ``model-index`` results of an existing card, or ``[]`` when there is no card or no results."""
    readme = Path(readme)
    if not readme.is_file():
        return []
    return list(ModelCard.load(readme).data.eval_results or [])


_MEASUREMENT = (
    "task_type",
    "dataset_name",
    "dataset_config",
    "dataset_split",
    "metric_type",
    "metric_name",
    "metric_config",
)
"""What tells two results apart: not the value, nor the command (``args``) that measured it."""


def _same_measurement(a: EvalResult, b: EvalResult) -> bool:
    return all(getattr(a, key) == getattr(b, key) for key in _MEASUREMENT)


def merge_results(old: Sequence[EvalResult], new: Sequence[EvalResult]) -> list[EvalResult]:
    """``old`` with every result that ``new`` measures again replaced, then the new ones appended.

    A measurement is replaced even when a different command (say, another batch size) measured it.
    """
    kept = [r for r in old if not any(_same_measurement(r, n) for n in new)]
    return kept + list(new)


def _label_fraction(result: EvalResult) -> str:
    fraction = (result.metric_args or {}).get("label_fraction")
    return "all" if fraction is None else f"{100 * fraction:g} %"


def results_table(results: Sequence[EvalResult]) -> str:
    """Markdown: the scores (percent), then every protocol that was run with the command that ran it."""
    if not results:
        return "Not evaluated yet: run `mvmr-evaluate --model THIS_FOLDER --update-card ...`."
    lines = ["| protocol | dataset | split | labels | metric | value |", "|---|---|---|---|---|---|"]
    runs: dict[tuple[str, str, str, str], str | None] = {}
    for r in results:
        dataset = r.dataset_name + (f" ({r.dataset_config})" if r.dataset_config else "")
        lines.append(
            f"| {r.metric_config or ''} | {dataset} | {r.dataset_split or ''} | {_label_fraction(r)} | "
            f"{r.metric_name or r.metric_type} | {r.metric_value} |"
        )
        run = (r.metric_config or "", dataset, r.dataset_split or "", _label_fraction(r))
        runs[run] = (r.metric_args or {}).get("command") or runs.get(run)
    lines += ["", "Protocols run (protocol, dataset, split, labels used, command):", ""]
    for (protocol, dataset, split, labels), command in runs.items():
        how = f"`{command}`" if command else "command not recorded"
        lines.append(f"- {protocol} on {dataset}, {split} split, {labels} labels: {how}")
    return "\n".join(lines)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "time not recorded"
    hours, rest = divmod(math.ceil(seconds), 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


def _loss_weights(training_args: Mapping[str, Any]) -> str:
    parts = [
        f"{symbol} = {training_args[key]}"
        for key, symbol in LOSS_WEIGHT_SYMBOLS.items()
        if key in training_args and training_args[key] not in (None, "")
    ]
    return ", ".join(parts) + " (β_k not listed: 1)" if parts else "see `training_args.json`"


def _objective_form(training_args: Mapping[str, Any]) -> str:
    """Which forms of eq. 4 and eq. 11 the run optimised (the printed equations or the released code's),
    and the feature-matching term when the run had one."""
    unbiased = training_args.get("dcor_estimator") == "unbiased"
    squared = training_args.get("dcor_squared")
    squared = unbiased if squared is None else squared
    reduction = training_args.get("invariance_reduction", "mean")
    invariance = "mean over all elements" if reduction == "mean" else "sum over dimensions (eq. 4 as printed)"
    estimator = "bias-corrected" if unbiased else "biased"
    form = f"invariance {invariance}; dCor {'R²' if squared else 'R'}, {estimator} estimator"
    # runs saved before --teacher-view: the teachers saw the non-augmented view
    view = "x̃" if training_args.get("teacher_view") == "augmented" else "x"
    if view == "x̃":
        form += (
            "; the teachers saw the augmented view (not in the paper): each teacher's dCor term is "
            "`1 − dCor(z̃, r_k(x̃))`"
        )
    matching = training_args.get("feature_matching_weight") or 0  # runs saved before it existed: none
    if matching > 0:
        form += (
            f"; plus feature matching (not in the paper) with weight {matching:g}: "
            f"`Σ_k [1 − cos(W_k·h + b_k, r_k({view}))]` over the teachers, where `h` are the backbone "
            f"features of `{view}` and the linear heads `W_k`, `b_k` were trained with the student (not part "
            "of this release)"
        )
    return form


def _teachers(training_args: Mapping[str, Any], info: CardInfo) -> list[str]:
    """One line per teacher: as the run loaded it, else as its arguments say (an export from a checkpoint)."""
    if info.teachers:
        return [
            f"teacher `{t['model']}` as `{t['name']}`: output `{t['output']}`, {t['input_size']}×"
            f"{t['input_size']} px input, β = {t['weight']:g}"
            for t in info.teachers
        ]
    weights = parse_weights(training_args.get("representation_weights") or "")
    return [
        f"teacher `{s.model}` as `{s.name}`: output `{s.output}`, β = {weights.get(s.name, 1.0):g}"
        for s in teacher_specs(training_args)
    ]


def _augmentations(training_args: Mapping[str, Any]) -> str:
    """The steps that made the augmented view x̃ (paper, section 7; a subset is its Table 7 ablation).

    Runs saved before ``--augmentations`` existed (no such key) used all five, before ``--crop-scale``
    the paper's crops.
    """
    saved = training_args.get("augmentations")
    kept = AUGMENTATIONS if saved is None else parse_augmentations(saved)
    if not kept:
        return "none: x̃ had the framing of the non-augmented view x, without any random step"
    low, high = parse_crop_scale(training_args.get("crop_scale") or DEFAULT_CROP_SCALE)
    crops = (
        ""
        if "crop" not in kept or (low, high) == DEFAULT_CROP_SCALE
        else (f", crops of {low:g}-{high:g} of the image's area (the paper's: 0.08-1)")
    )
    steps = ", ".join(f"`{name}`" for name in kept)
    if kept == AUGMENTATIONS:
        return f"{steps} (the paper's augmentation, section 7){crops}"
    return f"{steps} only (the paper's Table 7 ablation){crops}"


def _representations(training_args: Mapping[str, Any], info: CardInfo) -> str:
    parts = _teachers(training_args, info)
    handcrafted = training_args.get("handcrafted") or []
    if isinstance(handcrafted, str):
        handcrafted = [h for h in handcrafted.split(",") if h]
    parts += [f"`{name}`" for name in handcrafted]
    return ", ".join(parts) or "none (the view terms only)"


def _schedule(training_args: Mapping[str, Any], info: CardInfo) -> str:
    steps = info.step if info.step is not None else training_args.get("max_steps")
    return (
        f"{steps if steps is not None else 'unknown'} optimizer steps, batch size "
        f"{training_args.get('batch_size', 'unknown')}, "
        f"learning rate {training_args.get('learning_rate', 'unknown')}"
    )


def _alignment_line(alignment: Mapping[str, Any] | None) -> str:
    if alignment is None:
        return ""
    return (
        f"- **Alignment head**: a ridge-regression map from the backbone features to the normalised image "
        f"embedding of `{alignment['teacher']}`, fitted on {alignment['num_images']} unlabelled images "
        f"(held-out cosine {alignment['val_cosine']:.3f}); in `alignment.safetensors` / `alignment.json`, "
        "used for zero-shot classification.\n"
    )


def _base_model(teachers: Sequence[str]) -> str | list[str] | None:
    """The teachers on the Hub, for the card's ``base_model``: one id, a list of ids, or none."""
    hub_ids = [hub_id for hub_id in map(hub_id_or_none, teachers) if hub_id]
    return hub_ids[0] if len(hub_ids) == 1 else hub_ids or None


def _projector_line(spec: str) -> str:
    if spec == "none":
        return "none: `z` and `z̃` are the backbone features themselves, the features this release gives."
    return (
        f"`{spec}`, kept in `projector.safetensors` (described by `projector.json`) so that training can "
        "continue; downstream use takes the backbone features, not the projector output."
    )


def render_card(
    *,
    backbone: BackboneInfo,
    training_args: Mapping[str, Any],
    info: CardInfo,
    projector: str,
    alignment: Mapping[str, Any] | None = None,
    results: Sequence[EvalResult] = (),
) -> str:
    """Render the card (YAML metadata with ``model-index``, then the template body) as text.

    ``training_args`` is the run's argument dictionary (``teacher`` is ``None`` for self-supervised
    pretraining), ``projector`` the projector spec and ``alignment`` the content of ``alignment.json``.
    The result parses with ``huggingface_hub.ModelCard``.

    Args:
        backbone: what the card says about the exported timm backbone.
        training_args: the run's arguments as saved in ``training_args.json``.
        info: the run's facts (steps, hardware, time, command, Hub id, licence, teachers).
        projector: the projector spec (``"8192-8192-8192"``, ``"none"``).
        alignment: the content of ``alignment.json``; None when no alignment head was fitted.
        results: the ``model-index`` entries (:func:`~mvmr_hf.evaluation.to_eval_results`); none
            leaves the card without results.
    """
    teachers = [spec.model for spec in teacher_specs(training_args)]
    teacher = ", ".join(teachers)
    repo_id = info.repo_id or f"ORG/mvmr-{backbone.architecture}"
    model_name = repo_id.split("/")[-1]
    tags = [
        "mvmr",
        "timm",
        *(("distillation", "knowledge-distillation") if teacher else ("self-supervised",)),
    ]
    dataset_id = hub_id_or_none(training_args.get("dataset"))
    data = ModelCardData(
        library_name="timm",
        pipeline_tag=PIPELINE_TAG,
        license=info.license,
        tags=tags,
        base_model=_base_model(teachers),
        datasets=[dataset_id] if dataset_id else None,
        model_name=model_name if results else None,
        eval_results=list(results) or None,
    )
    if teacher:
        title = f"{backbone.architecture} distilled from {teacher} with MV-MR"
        summary = (
            f"A `timm` **{backbone.architecture}** student trained without labels to match "
            f"{'the teacher' if len(teachers) == 1 else f'{len(teachers)} teachers at once,'} "
            f"{', '.join(f'`{t}`' for t in teachers)}, by distance correlation (MV-MR knowledge "
            "distillation)."
        )
    else:
        title = f"{backbone.architecture} pretrained with MV-MR"
        summary = f"A `timm` **{backbone.architecture}** pretrained self-supervised with MV-MR (no labels)."
    hardware = info.hardware or "hardware not recorded"
    command = info.command or f"mvmr-{'distill' if teacher else 'pretrain'} --config training_args.json"
    template = Template(TEMPLATE.read_text(encoding="utf-8"))
    return template.substitute(
        metadata=data.to_yaml(),
        title=title,
        summary=summary,
        architecture=backbone.architecture,
        num_params=f"{backbone.num_params / 1e6:.1f} M",
        num_features=backbone.num_features,
        image_size=backbone.image_size,
        representations=_representations(training_args, info),
        augmentations=_augmentations(training_args),
        weights=_loss_weights(training_args),
        objective_form=_objective_form(training_args),
        dataset=f"`{training_args.get('dataset', 'unknown')}`",
        schedule=_schedule(training_args, info),
        hardware=f"{hardware}, {_duration(info.training_seconds)}",
        projector=_projector_line(projector),
        alignment=_alignment_line(alignment),
        repo_id=repo_id,
        zero_shot_route=" (for this student, through the alignment head)" if teacher else "",
        results=results_table(results),
        command=command,
    )
