"""The MV-MR objective (eq. 4-10) against hand computations in NumPy and the `dcor` package; the
feature-matching term (not in the paper) against NumPy and by fitting its head."""

from __future__ import annotations

import dcor as dcor_reference
import numpy as np
import pytest
import torch

from mvmr_hf.loss.objective import FeatureMatching, MVMRLoss, invariance, variance_hinge


def _batch(seed=0, batch=12, dim=5):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    z_aug = z + 0.3 * torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    return z, z_aug


def test_invariance_is_eq4_by_hand():
    z = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    z_aug = torch.tensor([[1.0, 0.0], [3.0, 3.0]])
    # (1/B) Σ ||z_i - z̃_i||² = ((0 + 4) + (9 + 16)) / 2
    assert invariance(z, z_aug, reduction="sum").item() == pytest.approx(14.5)
    # The released code's reduction: torch's mean squared error over all B·D elements.
    assert invariance(z, z_aug).item() == pytest.approx(torch.nn.functional.mse_loss(z, z_aug).item())
    assert invariance(z, z_aug).item() == pytest.approx(14.5 / 2)
    with pytest.raises(ValueError, match="invariance reduction"):
        invariance(z, z_aug, reduction="max")


def test_variance_hinge_is_eq5_eq6_by_hand():
    z = torch.tensor([[0.0, 10.0], [0.5, -10.0], [1.0, 0.0]])
    # column 0: var = 0.25 -> S = sqrt(0.2501); column 1: var = 100 -> hinge 0.
    expected = (max(0.0, 1.0 - np.sqrt(0.25 + 1e-4)) + 0.0) / 2
    assert variance_hinge(z).item() == pytest.approx(expected, rel=1e-6)
    assert variance_hinge(z, gamma=20.0, eps=0.0).item() == pytest.approx(((20 - 0.5) + (20 - 10)) / 2)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(("squared", "unbiased"), [(True, False), (False, False), (True, True)])
def test_total_and_terms_match_hand_computation(squared, unbiased, reduction):
    z, z_aug = _batch()
    generator = torch.Generator().manual_seed(1)
    teacher = torch.randn(12, 3, 4, generator=generator, dtype=torch.float64) + z[:, :1, None]
    hog = torch.rand(12, 7, generator=generator, dtype=torch.float64)
    weights = dict(invariance_weight=2.0, variance_weight=3.0, view_weight=0.5)
    loss_fn = MVMRLoss(
        **weights,
        representation_weights={"teacher": 4.0},
        squared=squared,
        unbiased=unbiased,
        invariance_reduction=reduction,
    )
    out = loss_fn(z, z_aug, {"teacher": teacher, "hog": hog})

    zn, zan = z.numpy(), z_aug.numpy()
    if unbiased:
        reference = dcor_reference.u_distance_correlation_sqr
    elif squared:
        reference = dcor_reference.distance_correlation_sqr
    else:
        reference = dcor_reference.distance_correlation

    def hinge(a):
        return np.maximum(0.0, 1.0 - np.sqrt(a.var(axis=0, ddof=1) + 1e-4)).mean()

    expected = {
        "invariance": 2.0
        * ((zn - zan) ** 2).sum(axis=1).mean()
        / (zn.shape[1] if reduction == "mean" else 1.0),
        "variance": 3.0 * (hinge(zn) + hinge(zan)),
        "dcor/views": 0.5 * (1 - reference(zan, zn)),
        "dcor/teacher": 4.0 * (1 - reference(zan, teacher.reshape(12, -1).numpy())),
        "dcor/hog": 1.0 * (1 - reference(zan, hog.numpy())),
    }
    assert set(out.terms) == set(expected)
    for name, value in expected.items():
        assert out.terms[name].item() == pytest.approx(value, abs=1e-9), name
    assert out.total.item() == pytest.approx(sum(expected.values()), abs=1e-9)
    assert out.dcor["dcor/hog"].item() == pytest.approx(1 - expected["dcor/hog"], abs=1e-9)


@pytest.mark.parametrize("scope", ["global", "local"])
def test_without_the_non_augmented_embedding_only_the_representation_terms_remain(scope):
    """λ = μ = α = 0: z may be None (the loop then skips the student's pass on x); the terms are eq. 9's."""
    _, z_aug = _batch()
    teacher = torch.randn(12, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    loss_fn = MVMRLoss(
        invariance_weight=0.0, variance_weight=0.0, view_weight=0.0, representation_weights={"teacher": 2.0},
        scope=scope,
    )  # fmt: skip
    assert not loss_fn.needs_non_augmented
    out = loss_fn(None, z_aug, {"teacher": teacher})
    expected = 2.0 * (1 - dcor_reference.distance_correlation(z_aug.numpy(), teacher.numpy()))
    assert set(out.terms) == {"dcor/teacher"}
    assert out.total.item() == pytest.approx(expected, abs=1e-9)
    assert MVMRLoss(view_weight=0.0).needs_non_augmented
    with pytest.raises(ValueError, match="λ, μ or α is not 0"):
        MVMRLoss(invariance_weight=0.0, variance_weight=0.0)(None, z_aug, {"teacher": teacher})


def test_gradients_flow_to_embeddings_only():
    z, z_aug = _batch()
    z.requires_grad_(True)
    z_aug.requires_grad_(True)
    representation = torch.randn(12, 9, dtype=torch.float64, requires_grad=True)
    MVMRLoss()(z, z_aug, {"r": representation}).total.backward()
    assert torch.isfinite(z.grad).all()
    assert z.grad.abs().sum() > 0
    assert torch.isfinite(z_aug.grad).all()
    assert z_aug.grad.abs().sum() > 0
    assert representation.grad is None  # representations are frozen targets


def test_local_scope_equals_global_on_one_process():
    z, z_aug = _batch()
    reps = {"r": torch.randn(12, 4, dtype=torch.float64)}
    a = MVMRLoss(scope="global")(z, z_aug, reps, gather={"r": False}).total
    b = MVMRLoss(scope="local")(z, z_aug, reps).total
    assert a.item() == pytest.approx(b.item(), abs=1e-12)


def test_default_form_is_r_for_the_biased_and_r2_for_the_unbiased_estimator():
    z, z_aug = _batch()
    zn, zan = z.numpy(), z_aug.numpy()
    biased = MVMRLoss()(z, z_aug).dcor["dcor/views"].item()
    assert biased == pytest.approx(dcor_reference.distance_correlation(zan, zn), abs=1e-9)
    unbiased = MVMRLoss(unbiased=True)(z, z_aug).dcor["dcor/views"].item()
    assert unbiased == pytest.approx(dcor_reference.u_distance_correlation_sqr(zan, zn), abs=1e-9)


def test_bad_configuration_and_shapes_raise_clearly():
    with pytest.raises(ValueError, match="only defined squared"):
        MVMRLoss(unbiased=True, squared=False)
    with pytest.raises(ValueError, match="invariance reduction"):
        MVMRLoss(invariance_reduction="median")
    with pytest.raises(ValueError, match="unknown dCor scope"):
        MVMRLoss(scope="world")
    z, z_aug = _batch()
    with pytest.raises(ValueError, match="same shape"):
        MVMRLoss()(z, z_aug[:, :3])
    with pytest.raises(ValueError, match="holds 5 samples"):
        MVMRLoss()(z, z_aug, {"teacher": torch.randn(5, 3)})
    with pytest.raises(ValueError, match="at least 4 samples"):
        MVMRLoss(unbiased=True)(z[:3], z_aug[:3])
    assert MVMRLoss(unbiased=True).min_batch_size == 4
    assert MVMRLoss().min_batch_size == 2


# ----------------------------------------------------------------------------- feature matching


def _features_and_targets(seed=0, batch=12, feature_dim=6):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, feature_dim, generator=generator)
    targets = {
        "teacher": torch.randn(batch, 4, generator=generator),
        "dino": torch.randn(batch, 9, generator=generator, dtype=torch.float64),
    }
    return features, targets


def test_feature_matching_is_one_minus_cosine_of_each_head_by_hand():
    features, targets = _features_and_targets()
    torch.manual_seed(0)
    matching = FeatureMatching(6, {"teacher": 4, "dino": 9}, weight=0.7)
    terms = matching(features, targets)

    assert list(terms) == ["match/teacher", "match/dino"]
    h = features.numpy().astype(np.float64)
    for name, target in targets.items():
        head = matching.heads[name]
        w, b = head.weight.detach().numpy().astype(np.float64), head.bias.detach().numpy().astype(np.float64)
        projected, t = h @ w.T + b, target.numpy().astype(np.float64)
        cosine = (projected * t).sum(1) / (np.linalg.norm(projected, axis=1) * np.linalg.norm(t, axis=1))
        assert terms[f"match/{name}"].dtype == torch.float32
        assert terms[f"match/{name}"].item() == pytest.approx(0.7 * np.mean(1 - cosine), rel=1e-5, abs=1e-6)


def test_feature_matching_runs_its_heads_in_float32_under_bf16_autocast():
    """Under the training loop's bf16 autocast the term is the float32 one, not bf16-rounded heads'."""
    features, targets = _features_and_targets()
    matching = FeatureMatching(6, {"teacher": 4, "dino": 9})
    plain = matching(features, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = matching(features, targets)
    for name, value in plain.items():
        assert autocast[name].dtype == torch.float32
        assert autocast[name].item() == value.item(), name


def test_feature_matching_trains_its_heads_and_the_features_but_not_the_targets():
    features, targets = _features_and_targets()
    features.requires_grad_(True)
    for target in targets.values():
        target.requires_grad_(True)
    matching = FeatureMatching(6, {"teacher": 4, "dino": 9})
    sum(matching(features, targets).values()).backward()
    assert torch.isfinite(features.grad).all()
    assert features.grad.abs().sum() > 0
    for name, head in matching.heads.items():
        assert head.weight.grad.abs().sum() > 0, name
        assert head.bias.grad.abs().sum() > 0, name
    assert all(target.grad is None for target in targets.values())  # the teachers are frozen targets


def test_a_fitted_head_drives_the_term_to_zero_on_a_linearly_related_target():
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(64, 8, generator=generator)
    mapping, offset = torch.randn(8, 5, generator=generator), torch.randn(5, generator=generator)
    targets = {"teacher": features @ mapping + offset}
    torch.manual_seed(0)
    matching = FeatureMatching(8, {"teacher": 5})
    optimizer = torch.optim.Adam(matching.parameters(), lr=1e-2)
    initial = matching(features, targets)["match/teacher"].item()
    for _ in range(400):
        optimizer.zero_grad()
        loss = matching(features, targets)["match/teacher"]
        loss.backward()
        optimizer.step()
    assert initial > 0.3
    assert matching(features, targets)["match/teacher"].item() < 1e-3


def test_loss_output_plus_adds_terms_to_the_total_and_keeps_the_dcor_values():
    z, z_aug = _batch()
    out = MVMRLoss()(z, z_aug, {"teacher": torch.randn(12, 3, dtype=torch.float64)})
    extra = {"match/teacher": torch.tensor(0.25, dtype=torch.float64)}
    combined = out.plus(extra)

    assert list(combined.terms) == [*out.terms, "match/teacher"]
    assert combined.total.item() == pytest.approx(sum(t.item() for t in combined.terms.values()), rel=1e-12)
    assert combined.total.item() == pytest.approx(out.total.item() + 0.25, rel=1e-12)
    assert combined.dcor.keys() == out.dcor.keys()
    assert "match/teacher" not in out.terms  # a new output: the original is unchanged
