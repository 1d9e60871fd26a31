"""TCC and GTCC losses: batched implementations against the loop references, and their edge cases."""

from __future__ import annotations

import pytest
import torch

import core.losses.gtcc as gtcc_module
from core.losses.gtcc import (
    FIT_STATS,
    _gmm_objective,
    anchor_windows,
    fit_mixtures,
    gtcc_loss,
    sample_anchors,
)
from core.losses.tcc import tcc_loss
from tests.reference.tcc_gtcc import fit_gmm_loop, gmm_objective, gtcc_loss_loop, tcc_loss_loop

F64 = torch.float64


def _videos(lengths: tuple[int, ...], dim: int = 5, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, dim, generator=gen, dtype=F64).requires_grad_() for n in lengths]


def _contexts(count: int, dim: int = 5, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(dim + 1, generator=gen, dtype=F64).requires_grad_() for _ in range(count)]


def _assert_grads_close(
    fast: torch.Tensor, slow: torch.Tensor, inputs: list[torch.Tensor], rtol: float
) -> None:
    fast_grads = torch.autograd.grad(fast, inputs)
    slow_grads = torch.autograd.grad(slow, inputs)
    for got, want in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))


@pytest.mark.parametrize(("softmax_temp", "alignment_variance"), [(0.1, 0.001), (0.5, 0.001), (0.5, 0.5)])
def test_tcc_matches_loop_reference_on_variable_lengths(
    softmax_temp: float, alignment_variance: float
) -> None:
    videos = _videos((7, 11, 5))
    fast = tcc_loss(videos, softmax_temp=softmax_temp, alignment_variance=alignment_variance)
    slow = tcc_loss_loop(videos, softmax_temp=softmax_temp, alignment_variance=alignment_variance)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=0.0)
    _assert_grads_close(fast, slow, videos, rtol=1e-9)


def test_tcc_is_finite_for_well_separated_embeddings() -> None:
    # one-hot cycle-back distributions: the release divided by a zero variance here
    videos = [(100 * v).detach().requires_grad_() for v in _videos((6, 8))]
    loss = tcc_loss(videos)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(v.grad).all() for v in videos)


@pytest.mark.parametrize(
    ("gamma", "alignment_variance"),
    [(0.9, 0.0), (1.0, 0.0), (0.8, 0.01)],
    ids=["drop", "no-drop", "variance"],
)
def test_gtcc_matches_loop_reference(gamma: float, alignment_variance: float) -> None:
    # 8 anchors: the 6-frame video uses all its frames; lengths differ, so frames and anchors are padded
    videos, contexts = _videos((9, 13, 6)), _contexts(3)
    settings = {
        "n_components": 3,
        "gamma": gamma,
        "delta": 0.3,
        "softmax_temp": 0.5,
        "alignment_variance": alignment_variance,
        "epoch": 2,
        "n_anchors": 8,
    }
    fast = gtcc_loss(videos, contexts, generator=torch.Generator().manual_seed(3), **settings)
    slow = gtcc_loss_loop(videos, contexts, generator=torch.Generator().manual_seed(3), **settings)
    torch.testing.assert_close(fast, slow, rtol=1e-7, atol=0.0)
    inputs = videos + contexts if gamma < 1 else videos
    _assert_grads_close(fast, slow, inputs, rtol=1e-5)


def test_gmm_objective_gradient_matches_autograd() -> None:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([9, 6, 9, 4])  # rows 2 and 4 are padded
    p = torch.softmax(3 * torch.randn(4, 9, generator=gen, dtype=F64), dim=1)
    p = torch.where(torch.arange(9) < lengths[:, None], p, 0.0)
    p = p / p.sum(1, keepdim=True)
    k = 3
    means = torch.tensor([[-1.0, 4.0, 12.0], [2.5, 7.0, 0.3], [8.0, 8.5, 1.0], [1.0, 2.0, 3.5]], dtype=F64)
    variances = torch.tensor([[0.2, 3.0, 40.0], [1.0, 0.6, 2.0], [9.0, 0.4, 5.0], [0.7, 1.5, 0.5]], dtype=F64)
    logits = torch.randn(4, k, generator=gen, dtype=F64)
    params = torch.cat([means, variances, logits], dim=1)
    value, grad = _gmm_objective(params, p, torch.log(p + 1e-30), lengths)
    for row in range(4):
        n = int(lengths[row])
        leaf = params[row].clone().requires_grad_()
        want = gmm_objective(p[row, :n], leaf[:k], leaf[k : 2 * k], leaf[2 * k :])[0]
        (want_grad,) = torch.autograd.grad(want, leaf)
        torch.testing.assert_close(value[row], want.detach(), rtol=1e-12, atol=0.0)
        torch.testing.assert_close(grad[row], want_grad, rtol=1e-9, atol=1e-12)


def test_batched_fit_matches_torch_lbfgs_per_row() -> None:
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([12, 7, 12, 10, 3])
    logits = 4 * torch.randn(5, 12, generator=gen, dtype=F64)
    p = torch.softmax(logits.masked_fill(torch.arange(12) >= lengths[:, None], float("-inf")), dim=1)
    components, weights = fit_mixtures(p, lengths, n_components=4, max_iters=8)
    for row in range(5):
        n = int(lengths[row])
        want_components, want_weights = fit_gmm_loop(p[row, :n], n_components=4, max_iters=8)
        torch.testing.assert_close(components[row, :, :n], want_components, rtol=0.0, atol=1e-7)
        torch.testing.assert_close(weights[row], want_weights, rtol=0.0, atol=1e-7)
        assert not components[row, :, n:].any()  # padded frames get no mass


def test_non_finite_fit_falls_back_to_a_moment_matched_gaussian(monkeypatch: pytest.MonkeyPatch) -> None:
    real_lbfgs = gtcc_module._lbfgs

    def broken_lbfgs(objective, x, n_steps):
        params, value = real_lbfgs(objective, x, n_steps)
        return params.index_fill(0, torch.tensor([1]), float("nan")), value

    monkeypatch.setattr(gtcc_module, "_lbfgs", broken_lbfgs)
    p = torch.tensor([[0.1, 0.2, 0.4, 0.2, 0.1], [0.0, 0.1, 0.2, 0.3, 0.4]], dtype=F64)
    before = FIT_STATS["fallbacks"]
    with pytest.warns(RuntimeWarning, match="1 of 2 mixture fits"):
        components, weights = fit_mixtures(p, torch.tensor([5, 5]), n_components=3, max_iters=2)
    assert FIT_STATS["fallbacks"] == before + 1
    idx = torch.arange(5, dtype=F64)
    mean = (p[1] * idx).sum()
    var = (p[1] * (idx - mean) ** 2).sum()
    gaussian = torch.exp(-0.5 * (idx - mean) ** 2 / var)
    torch.testing.assert_close(components[1], (gaussian / gaussian.sum()).expand(3, -1))
    torch.testing.assert_close(weights[1], torch.full((3,), 1 / 3, dtype=F64))
    assert torch.isfinite(components[0]).all()


def test_gtcc_on_videos_shorter_than_the_anchor_count_is_finite() -> None:
    videos, contexts = _videos((3, 5)), _contexts(2)
    loss = gtcc_loss(videos, contexts, n_components=15, gamma=0.95, delta=0.2, n_anchors=20)
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(torch.isfinite(t.grad).all() for t in videos + contexts)


@pytest.mark.parametrize(
    "videos",
    [
        [torch.ones(12, 8), torch.ones(9, 8), torch.ones(15, 8)],  # identical frames, zero distances
        [torch.full((12, 8), 1e7), torch.full((9, 8), -1e7)],  # identical frames, huge magnitudes
        [1e6 * torch.randn(12, 8), 1e6 * torch.randn(9, 8)],  # one-hot softmaxes everywhere
    ],
    ids=["identical", "huge-identical", "huge"],
)
def test_gtcc_on_degenerate_input_is_finite(videos: list[torch.Tensor]) -> None:
    videos = [v.requires_grad_() for v in videos]
    contexts = [torch.randn(9, requires_grad=True) for _ in videos]
    loss = gtcc_loss(videos, contexts, n_components=5, gamma=0.95, delta=0.2)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(t.grad).all() for t in videos + contexts)


def test_gradient_reaches_every_input() -> None:
    videos, contexts = _videos((10, 14, 12)), _contexts(3)
    gtcc_loss(videos, contexts, n_components=4, gamma=0.9, delta=0.3, n_anchors=6).backward()
    tcc_videos = [v.detach().clone().requires_grad_() for v in videos]
    tcc_loss(tcc_videos, softmax_temp=0.5).backward()
    for tensor in videos + contexts + tcc_videos:
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0


def test_gamma_one_makes_drop_handling_a_no_op() -> None:
    videos = _videos((10, 14, 12))
    settings = {"n_components": 4, "gamma": 1.0, "delta": 0.3, "n_anchors": 6}
    contexts, others = _contexts(3, seed=1), _contexts(3, seed=2)
    with_contexts = gtcc_loss(videos, contexts, generator=torch.Generator().manual_seed(0), **settings)
    with_others = gtcc_loss(videos, others, generator=torch.Generator().manual_seed(0), **settings)
    without = gtcc_loss(videos, None, generator=torch.Generator().manual_seed(0), **settings)
    assert with_contexts.item() == with_others.item() == without.item()
    assert torch.autograd.grad(with_contexts, contexts, allow_unused=True) == (None, None, None)
    # while gamma < 1 lets the drop contexts change the loss
    dropping = {**settings, "gamma": 0.9}
    a = gtcc_loss(videos, contexts, generator=torch.Generator().manual_seed(0), **dropping)
    b = gtcc_loss(videos, others, generator=torch.Generator().manual_seed(0), **dropping)
    assert a.item() != b.item()


def test_gtcc_of_a_single_video_is_a_differentiable_zero() -> None:
    videos = _videos((7,))
    loss = gtcc_loss(videos, _contexts(1), n_components=3, gamma=0.9, delta=0.3)
    loss.backward()
    assert loss.item() == 0.0 and videos[0].grad is not None


def test_anchor_sampling_is_reproducible_and_draws_only_from_the_generator() -> None:
    lengths = torch.tensor([30, 7, 20, 1])
    torch.manual_seed(123)
    global_state = torch.get_rng_state()
    first = sample_anchors(lengths, 20, generator=torch.Generator().manual_seed(5))
    again = sample_anchors(lengths, 20, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), global_state)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    assert first.anchors.shape == (4, 20)
    for row, n in enumerate(lengths.tolist()):
        picked = first.anchors[row][first.anchor_mask[row]]
        assert len(picked) == min(20, n)
        assert len(set(picked.tolist())) == len(picked)  # without replacement
        assert torch.equal(picked, picked.sort().values) and picked.min() >= 0 and picked.max() < n


def _release_window(n: int, width: int, shift: int) -> torch.Tensor:
    """The release's construction: a band from triangular masks, xor-ed, plus two corner blocks."""
    ones = torch.ones(n, n)
    lower = 1 - torch.triu(ones, diagonal=shift + 1).T
    upper = torch.triu(ones, diagonal=width - shift)
    corners = torch.zeros(n, n, dtype=torch.bool)
    corners[:width, :width] = True
    corners[-width:, -width:] = True
    return torch.logical_xor(lower.bool(), upper.bool()) | corners


@pytest.mark.parametrize("delta", [0.2, 0.5, 1.0])
def test_anchor_windows_match_the_release_construction(delta: float) -> None:
    lengths = torch.tensor([23, 10, 4])
    anchors = torch.arange(23).expand(3, -1) % lengths[:, None]  # every frame (wrapped for short videos)
    for backward in (False, True):
        windows = anchor_windows(lengths, anchors, torch.full((3,), backward), delta)
        for row, n in enumerate(lengths.tolist()):
            width = max(1, round(n * delta))
            want = _release_window(n, width, width if backward else 0)[anchors[row]]  # (A, n)
            assert torch.equal(windows[row, :, :n], want)
            assert not windows[row, :, n:].any()
            assert windows[row].any(dim=1).all()  # every anchor can cycle back somewhere
