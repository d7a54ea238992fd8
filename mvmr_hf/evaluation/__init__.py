"""Evaluation of frozen features: linear probe, kNN, zero-shot and multi-label classification.

The paper evaluates with a linear classifier on frozen backbone features (section 6, "linear
evaluation protocol"), and measures transfer to VOC07 with a linear classifier on frozen
features scored by mAP (section 6, Table 3); we add the kNN protocol of DINO and zero-shot
classification through a CLIP-style teacher's text tower. Features are extracted once per
(model, dataset, split) with the model's own preprocessing of the non-augmented view and cached
as safetensors.

* :func:`linear_probe`: multinomial logistic regression on standardised features, full-batch
  L-BFGS, weight decay chosen on a validation split carved from a random subsample of at most
  :data:`SEARCH_ROWS` (100,000) training rows (never the test split), then refitted on the whole
  training split; top-1 and top-5.
* :func:`knn_classify`: cosine similarity, k = 20 nearest training samples, votes weighted by
  ``exp(similarity / 0.07)`` (DINO's protocol).
* :func:`zero_shot`: cosine similarity between image embeddings and the text embeddings of
  ``"a photo of a {label}"`` (:func:`text_embeddings`).
* :func:`multilabel_probe` (protocol ``multilabel``, paper Table 3): one logistic regression per
  class (one-vs-rest) on standardised features, fitted and searched as :func:`linear_probe`'s,
  scored by mAP (:func:`~mvmr_hf.evaluation.multilabel.mean_average_precision`), for label columns that
  list several classes per image (:mod:`mvmr_hf.evaluation.multilabel` tells the kinds apart). VOC07 as in
  the paper: train on trainval, report mAP on test. Where we differ: the AP is the
  non-interpolated one (scikit-learn's, the VOC2010+ devkit's), not the VOC2007 devkit's 11-point
  interpolated AP; "difficult" objects count as the label column says (no ignore mask); and the
  classifier is fitted to convergence with L-BFGS (the problem is convex) where the paper trains
  it for 100 epochs.

Scale. Under ``accelerate launch`` / ``torchrun`` with P processes, process ``p`` extracts rows
``p, p + P, ...`` of the split and the shares are gathered, so every process holds the split's
features in row order, those of a single process. The features stay on the evaluation device
when they take at most half its free memory (:func:`feature_device`), else on the CPU: ImageNet's
training split, 1.28 M x 2048, takes 10.5 GB in float32 (5.2 GB in float16, which the probe and
kNN also take), so it stays on a GPU with 21 GB free. The probe and kNN run on the device in
chunks of about :data:`CHUNK_ELEMENTS` numbers (128 MiB in float32): the probe adds up its loss
and gradient over chunks of rows (ImageNet's 1.28 M x 1000 logits, 5 GB, never exist at once),
kNN keeps a running top-k over blocks of training rows; features left on the CPU cross to the
device a chunk at a time. The feature cache on disk stays safetensors, written by the main process.

:func:`load_encoder` turns ``--model`` (a release folder, a Hub id, a timm name, a transformers
model) into an :class:`Encoder`; :func:`extract_features` runs it over a split; :func:`evaluate`
runs the protocols and :func:`to_eval_results` makes the card's ``model-index`` entries.

Example::

    encoder = load_encoder("runs/kd/student")
    results = evaluate(encoder, "./digits", protocols=["linear", "knn"], cache_dir="features-cache")
    print(format_table(results))

    split = load_image_dataset("./digits", split="train", streaming=False)
    train = extract_features(encoder, split)                    # FeatureSet(features, labels, skipped)

Modules, one per job: :mod:`.features`, :mod:`.probe` (linear and multi-label), :mod:`.knn`,
:mod:`.zeroshot`, :mod:`.multilabel` (label kinds, multi-hot targets, AP), :mod:`.results` (the
card's entries), :mod:`.protocols` (:func:`evaluate`) and :mod:`.finetuning` (paper Table 1).
"""

from mvmr_hf.evaluation.features import (
    Encoder,
    FeatureSet,
    class_names,
    extract_features,
    feature_device,
    load_encoder,
    locate_model,
    timm_encoder,
)
from mvmr_hf.evaluation.finetuning import (
    FinetuneResult,
    Finetuning,
    default_finetune_dir,
    finetune,
    global_batches,
    labelled_subset,
)
from mvmr_hf.evaluation.knn import knn_classify, knn_scores
from mvmr_hf.evaluation.multilabel import (
    MultiHot,
    average_precisions,
    column_kind,
    mean_average_precision,
    multi_hot_encoding,
)
from mvmr_hf.evaluation.probe import (
    Accuracy,
    MultiLabelResult,
    ProbeResult,
    linear_probe,
    multilabel_probe,
    topk_accuracy,
)
from mvmr_hf.evaluation.protocols import check_label_kind, evaluate, parse_protocols
from mvmr_hf.evaluation.results import ProtocolResult, format_table, to_eval_results
from mvmr_hf.evaluation.zeroshot import text_embeddings, zero_shot, zero_shot_scores

__all__ = [
    "Accuracy",
    "Encoder",
    "FeatureSet",
    "FinetuneResult",
    "Finetuning",
    "MultiHot",
    "MultiLabelResult",
    "ProbeResult",
    "ProtocolResult",
    "average_precisions",
    "check_label_kind",
    "class_names",
    "column_kind",
    "default_finetune_dir",
    "evaluate",
    "extract_features",
    "feature_device",
    "finetune",
    "format_table",
    "global_batches",
    "knn_classify",
    "knn_scores",
    "labelled_subset",
    "linear_probe",
    "load_encoder",
    "locate_model",
    "mean_average_precision",
    "multi_hot_encoding",
    "multilabel_probe",
    "parse_protocols",
    "text_embeddings",
    "timm_encoder",
    "to_eval_results",
    "topk_accuracy",
    "zero_shot",
    "zero_shot_scores",
]
