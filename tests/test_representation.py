"""Reconstruction and representation metrics against loop references; the probe measures something."""

import math

import pytest
import torch

from core.metrics.representation import (
    fit_linear_probe,
    linear_probe_accuracy,
    majority_accuracy,
    per_pair_mse,
    psnr,
    reconstruction_metrics,
    retrieval_score,
    softmax_probe_loss,
    standardize,
)
from tests.reference.representation import (
    per_pair_mse_loop,
    predict_loop,
    reconstruction_metrics_loop,
    retrieval_score_loop,
    softmax_probe_loss_loop,
)


def test_per_pair_mse_matches_loop_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(3, 3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.rand(3, 3, 5, 4, generator=g, dtype=torch.float64)
    fast = per_pair_mse(pred, target)
    torch.testing.assert_close(fast, per_pair_mse_loop(pred.detach(), target), rtol=1e-12, atol=1e-14)
    weights = torch.tensor([0.3, 1.0, 2.0], dtype=torch.float64)
    (grad,) = torch.autograd.grad((weights * fast).sum(), pred)
    # d/dpred of w_b * mean((pred - target)^2) = w_b * 2 (pred - target) / (C H W)
    expected = weights.view(3, 1, 1, 1) * 2 * (pred.detach() - target) / (3 * 5 * 4)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)


def test_psnr_is_the_decibel_ratio_and_finite_for_a_perfect_prediction():
    mse = torch.tensor([1.0, 0.01, 1e-4, 0.0], dtype=torch.float64)
    torch.testing.assert_close(psnr(mse), torch.tensor([0.0, 20.0, 40.0, 100.0], dtype=torch.float64))


def test_reconstruction_metrics_per_gap_match_loop():
    g = torch.Generator().manual_seed(1)
    mse = torch.rand(40, generator=g, dtype=torch.float64) * 0.05
    gaps = torch.randint(1, 6, (40,), generator=g)
    named = {"k1": 1, "kmid": 3, "kmax": 5, "k9": 9}  # k=9 has no pairs: NaN, not an error
    fast = reconstruction_metrics(mse, gaps, named, prefix="copy_")
    ref = reconstruction_metrics_loop(mse.tolist(), gaps.tolist(), named, prefix="copy_")
    assert fast.keys() == ref.keys()
    for key, value in ref.items():
        if math.isnan(value):
            assert math.isnan(fast[key]), key
        else:
            assert fast[key] == pytest.approx(value, rel=1e-12), key


def test_probe_loss_matches_loop_values_and_gradients():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=g)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    fast = softmax_probe_loss(w, b, x, y, l2=0.3)
    ref = softmax_probe_loss_loop(w, b, x, y, l2=0.3)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-14)
    for a, r in zip(torch.autograd.grad(fast, (w, b)), torch.autograd.grad(ref, (w, b)), strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def test_fitted_probe_is_the_minimum_of_the_loop_objective():
    """Strictly convex objective: the fit is right iff the loop reference's gradient vanishes there."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 5, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * torch.randn(30, generator=g, dtype=torch.float64) > 0).long() + (x[:, 1] > 1).long()
    (xs,) = standardize(x)
    w, b = fit_linear_probe(xs, y, num_classes=3, l2=0.05)
    w, b = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    grads = torch.autograd.grad(softmax_probe_loss_loop(w, b, xs, y, l2=0.05), (w, b))
    assert max(float(gr.abs().max()) for gr in grads) < 1e-7
    # and the accuracy is the loop's argmax accuracy
    acc = linear_probe_accuracy(x, y, x, y, num_classes=3, l2=0.05)
    loop_pred = predict_loop(w.detach(), b.detach(), xs)
    assert acc == pytest.approx(sum(int(p == t) for p, t in zip(loop_pred, y.tolist(), strict=True)) / 30)


def test_probe_is_deterministic():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(50, 8, generator=g), torch.randint(0, 4, (50,), generator=g)
    assert linear_probe_accuracy(x[:30], y[:30], x[30:], y[30:]) == linear_probe_accuracy(
        x[:30], y[:30], x[30:], y[30:]
    )


def test_probe_separates_informative_features_and_is_at_chance_on_noise():
    """A check that the probe measures something: labels encoded linearly -> ~1, unrelated -> chance."""
    g = torch.Generator().manual_seed(5)
    n, d, c = 600, 16, 4
    y = torch.randint(0, c, (n,), generator=g)
    centres = torch.randn(c, d, generator=g) * 3
    informative = centres[y] + torch.randn(n, d, generator=g)
    noise = torch.randn(n, d, generator=g)
    tr, te = slice(0, 400), slice(400, n)
    assert linear_probe_accuracy(informative[tr], y[tr], informative[te], y[te]) > 0.95
    chance = majority_accuracy(y[tr], y[te])
    assert abs(linear_probe_accuracy(noise[tr], y[tr], noise[te], y[te]) - 1 / c) < 0.1
    assert 0.15 < chance < 0.35
    assert retrieval_score(informative[te], y[te], informative[tr], y[tr]) > 0.9
    assert abs(retrieval_score(noise[te], y[te], noise[tr], y[tr]) - 1 / c) < 0.1


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("with_db", [False, True])
def test_retrieval_score_matches_loop(k, with_db):
    g = torch.Generator().manual_seed(6)
    q, qy = torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)
    db, dby = torch.randn(20, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (20,), generator=g)
    args = (q, qy, db, dby) if with_db else (q, qy)
    assert retrieval_score(*args, k=k) == pytest.approx(retrieval_score_loop(*args, k=k), abs=1e-12)


def test_leave_one_out_retrieval_never_finds_the_query_itself():
    x = torch.eye(4, dtype=torch.float64).repeat(2, 1)  # each vector twice
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    assert retrieval_score(x, y) == 1.0  # its twin, not itself
    assert retrieval_score(x, torch.arange(8)) == 0.0  # with itself excluded nothing shares a label


def test_majority_accuracy_is_the_most_common_training_label_rate():
    assert majority_accuracy(torch.tensor([2, 2, 1]), torch.tensor([2, 0, 1, 2])) == 0.5
