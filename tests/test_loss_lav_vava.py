"""Batched soft-DTW, LAV and VAVA against the loop references in tests/reference/lav_vava.py."""

from __future__ import annotations

import pytest
import torch

from core.losses.lav import contrastive_idm, lav_loss
from core.losses.soft_dtw import soft_dtw
from core.losses.vava import vava_loss, vava_phi
from tests.reference.lav_vava import cidm_reference, lav_reference, soft_dtw_reference, vava_reference

# Lengths above the CIDM window (15) so the hinge term is exercised, and one short video.
LENGTHS = (9, 23, 17, 4)


def _videos(
    lengths: tuple[int, ...], *, dim: int = 6, scale: float = 0.5, seed: int = 0, dtype=torch.float64
) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(t, dim, generator=g, dtype=dtype)).requires_grad_() for t in lengths]


def _assert_close_grads(fast: torch.Tensor, slow: torch.Tensor, inputs: list[torch.Tensor]) -> None:
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)
    fast_grads = torch.autograd.grad(fast, inputs)
    slow_grads = torch.autograd.grad(slow, inputs)
    scale = max(g.abs().max().item() for g in slow_grads)
    assert scale > 0
    for f, s in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(f, s, rtol=1e-9, atol=1e-11 * scale)


@pytest.mark.parametrize("gamma", [0.1, 1.0])
def test_soft_dtw_matches_double_loop_with_variable_lengths(gamma: float) -> None:
    g = torch.Generator().manual_seed(1)
    rows, cols = torch.tensor([9, 4, 6, 1]), torch.tensor([11, 7, 1, 5])
    cost = (3 * torch.rand(4, 9, 11, generator=g, dtype=torch.float64)).requires_grad_()
    with torch.no_grad():  # garbage beyond each pair's lengths must not matter
        for p in range(4):
            cost[p, rows[p] :, :] = 1e3
            cost[p, :, cols[p] :] = -1e3
    fast = soft_dtw(cost, rows, cols, gamma=gamma)
    slow = torch.stack([soft_dtw_reference(cost[p, : rows[p], : cols[p]], gamma) for p in range(4)])
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    (fast_grad,) = torch.autograd.grad((weights * fast).sum(), cost)
    (slow_grad,) = torch.autograd.grad((weights * slow).sum(), cost)
    torch.testing.assert_close(fast_grad, slow_grad, rtol=1e-10, atol=1e-12)
    beyond = torch.ones_like(cost, dtype=torch.bool)
    for p in range(4):
        beyond[p, : rows[p], : cols[p]] = False
    assert fast_grad[beyond].abs().max() == 0


def test_soft_dtw_is_symmetric_under_transposition() -> None:
    # lav_loss solves each unordered pair once and counts it twice; this is the property that allows it.
    g = torch.Generator().manual_seed(2)
    cost = torch.rand(3, 8, 8, generator=g, dtype=torch.float64)
    rows, cols = torch.tensor([8, 5, 3]), torch.tensor([6, 8, 7])
    forward = soft_dtw(cost, rows, cols, gamma=0.1)
    transposed = soft_dtw(cost.transpose(1, 2), cols, rows, gamma=0.1)
    torch.testing.assert_close(forward, transposed, rtol=1e-12, atol=1e-12)


def test_soft_dtw_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        soft_dtw(torch.rand(1, 3, 3), torch.tensor([3]), torch.tensor([3]), gamma=0.0)
    with pytest.raises(ValueError):
        soft_dtw(torch.rand(1, 3, 3), torch.tensor([0]), torch.tensor([3]), gamma=0.1)


def test_cidm_matches_reference_and_inside_window_has_no_gradient() -> None:
    videos = _videos((40, 10), scale=0.3)
    x = torch.nn.utils.rnn.pad_sequence(videos, batch_first=True)
    fast = contrastive_idm(x, torch.tensor([40, 10]))
    slow = torch.stack([cidm_reference(v) for v in videos])
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    long_grad, short_grad = torch.autograd.grad(fast.sum(), videos)
    assert long_grad.abs().max() > 0  # the hinge outside the window trains
    assert short_grad.abs().max() == 0  # 10 frames: all pairs inside the window, a constant
    gap = torch.arange(10.0, dtype=torch.float64)
    torch.testing.assert_close(fast[1], (2.0 * ((gap[:, None] - gap[None, :]) ** 2 + 1)).sum())


@pytest.mark.parametrize(("min_temp", "cr_coefficient"), [(0.1, 0.01), (0.5, 1.0)])
def test_lav_matches_loop_reference(min_temp: float, cr_coefficient: float) -> None:
    videos = _videos(LENGTHS)
    fast = lav_loss(videos, min_temp=min_temp, cr_coefficient=cr_coefficient)
    slow = lav_reference(videos, min_temp=min_temp, cr_coefficient=cr_coefficient)
    _assert_close_grads(fast, slow, videos)


@pytest.mark.parametrize("distance", ["constant", "transport"])
@pytest.mark.parametrize("epoch", [0, 7, 100_000])
def test_vava_matches_loop_reference(distance: str, epoch: int) -> None:
    videos = _videos(LENGTHS, seed=epoch)
    fast = vava_loss(videos, epoch=epoch, distance=distance)
    slow = vava_reference(videos, epoch=epoch, distance=distance)
    _assert_close_grads(fast, slow, videos)


def test_vava_matches_loop_reference_with_other_parameters() -> None:
    videos = _videos((5, 18, 11), seed=3)
    params = dict(zeta=1.5, delta=0.3, lambda1=0.5, lambda2=0.7, gamma=2.0, sinkhorn_iters=7)
    fast = vava_loss(videos, epoch=2, distance="transport", **params)
    slow = vava_reference(videos, epoch=2, distance="transport", **params)
    _assert_close_grads(fast, slow, videos)


def test_vava_phi_decays_and_is_clipped() -> None:
    assert vava_phi(0) == pytest.approx(0.999)
    assert vava_phi(100) == pytest.approx(0.999**101)
    assert vava_phi(10**6) == 0.001


def _degenerate_batches() -> dict[str, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(4)
    base = torch.randn(12, 8, generator=g)
    return {
        "three_frames": [torch.randn(3, 8, generator=g) for _ in range(4)],
        "one_frame": [torch.randn(1, 8, generator=g), torch.randn(5, 8, generator=g)],
        "all_zero": [torch.zeros(20, 8), torch.zeros(6, 8), torch.zeros(3, 8)],
        "identical_videos": [base.clone(), base.clone(), base.clone()],
        "constant_frames": [torch.ones(30, 8), 2 * torch.ones(17, 8)],
        "huge_scale": [1e3 * torch.randn(25, 8, generator=g) for _ in range(3)],
    }


@pytest.mark.parametrize("case", sorted(_degenerate_batches()))
@pytest.mark.parametrize("loss_name", ["lav", "vava", "vava_transport"])
def test_losses_finite_on_short_and_degenerate_inputs(case: str, loss_name: str) -> None:
    videos = [v.requires_grad_() for v in _degenerate_batches()[case]]  # float32, the training dtype
    loss_fn = {
        "lav": lav_loss,
        "vava": vava_loss,
        "vava_transport": lambda s: vava_loss(s, distance="transport"),
    }[loss_name]
    loss = loss_fn(videos)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert torch.isfinite(loss)
    for grad in torch.autograd.grad(loss, videos):
        assert torch.isfinite(grad).all()


def test_single_video_batch_gives_zero_with_a_graph() -> None:
    (video,) = _videos((7,))
    for loss in (lav_loss([video]), vava_loss([video])):
        assert loss.item() == 0
        (grad,) = torch.autograd.grad(loss, video)
        assert grad.abs().max() == 0


@pytest.mark.parametrize("loss_fn", [lav_loss, vava_loss])
def test_batch_loss_is_the_sum_of_its_pairs(loss_fn) -> None:
    # The release compounded lambda1/lambda2 across pairs (loss ~1e13 at batch 3); here the loss of a batch
    # is exactly the sum over its unordered pairs of the two-video loss (both orders of each pair).
    videos = _videos(LENGTHS, seed=5)
    batch = loss_fn(videos)
    pairs = sum(
        loss_fn([videos[i], videos[j]]) for i in range(len(videos)) for j in range(i + 1, len(videos))
    )
    torch.testing.assert_close(batch, pairs, rtol=1e-10, atol=0.0)
    assert abs(batch.item()) < 1e8


def test_vava_transport_distance_differs_and_has_gradient() -> None:
    videos = _videos(LENGTHS, seed=6)
    constant = vava_loss(videos)
    transport = vava_loss(videos, distance="transport")
    assert not torch.isclose(constant, transport)
    # Only the distance term differs, so this gradient is the transport cost's own.
    grads = torch.autograd.grad(transport - constant, videos)
    assert all(torch.isfinite(g).all() for g in grads)
    assert max(g.abs().max().item() for g in grads) > 1e-3


def test_vava_rejects_unknown_distance() -> None:
    with pytest.raises(ValueError, match="distance"):
        vava_loss(_videos((4, 5)), distance="euclidean")
