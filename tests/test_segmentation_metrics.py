"""ARI / VideoARI / FG-ARI / mBO against slow loop references, their degenerate cases, and the baselines."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from core.metrics.segmentation import (
    ari,
    hungarian_miou,
    masks_to_labels,
    mbo,
    random_mask_baseline,
    video_ari,
)
from tests.reference.segmentation import (
    ari_contingency_loop,
    ari_pairs_loop,
    hungarian_miou_loop,
    mbo_loop,
    video_ari_loop,
)


def _labels(gen: torch.Generator, shape: tuple[int, ...], n_labels: int, values: list[int] | None = None):
    idx = torch.randint(0, n_labels, shape, generator=gen)
    return idx if values is None else torch.tensor(values)[idx]


# ---------------------------------------------------------------- ARI against the references


def test_ari_matches_pair_counting_definition() -> None:
    gen = torch.Generator().manual_seed(0)
    for n_true, n_pred in [(1, 1), (1, 3), (2, 2), (3, 5), (6, 2), (25, 25)]:
        true = _labels(gen, (5, 25), n_true)
        pred = _labels(gen, (5, 25), n_pred, values=[7, 1000, 3, -2, 42][:n_pred] if n_pred <= 5 else None)
        got = ari(true, pred)
        assert got.dtype == torch.float64 and got.shape == (5,)
        for b in range(5):
            expected = ari_pairs_loop(true[b].tolist(), pred[b].tolist())
            assert got[b].item() == pytest.approx(expected, abs=1e-12), (n_true, n_pred, b)


def test_ari_matches_contingency_loop_on_larger_inputs() -> None:
    gen = torch.Generator().manual_seed(1)
    true = _labels(gen, (4, 600), 5)
    # correlated prediction: copy the truth, relabel it and corrupt a growing share of points
    pred = (true * 3 + 11) % 17
    for b in range(4):
        flip = torch.rand(600, generator=gen) < 0.15 * b
        pred[b, flip] = _labels(gen, (int(flip.sum()),), 6)
    got = ari(true, pred)
    expected = [ari_contingency_loop(true[b].tolist(), pred[b].tolist()) for b in range(4)]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    assert got[0].item() == 1.0 and got[3].item() < got[1].item() < 1.0


def test_ari_matches_sklearn_when_installed() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    gen = torch.Generator().manual_seed(2)
    true, pred = _labels(gen, (6, 300), 4), _labels(gen, (6, 300), 7)
    pred[:3] = true[:3] * 2  # some rows agree perfectly
    got = ari(true, pred)
    for b in range(6):
        assert got[b].item() == pytest.approx(metrics.adjusted_rand_score(true[b], pred[b]), abs=1e-12)


def test_ari_valid_mask_equals_dropping_points() -> None:
    gen = torch.Generator().manual_seed(3)
    true, pred = _labels(gen, (3, 80), 4), _labels(gen, (3, 80), 5)
    valid = torch.rand(3, 80, generator=gen) < 0.6
    got = ari(true, pred, valid=valid)
    for b in range(3):
        keep = valid[b]
        assert got[b].item() == pytest.approx(ari_pairs_loop(true[b][keep].tolist(), pred[b][keep].tolist()))


# ---------------------------------------------------------------- ARI degenerate and limiting cases


def test_ari_is_one_when_both_labelings_are_a_single_cluster() -> None:
    true = torch.zeros(2, 50, dtype=torch.long)
    pred = torch.full((2, 50), 4)
    assert ari(true, pred).tolist() == [1.0, 1.0]


def test_ari_is_one_when_both_labelings_are_all_singletons() -> None:
    true = torch.arange(30)[None]
    pred = torch.arange(30).flip(0)[None] + 100
    assert ari(true, pred).item() == 1.0


def test_ari_is_zero_when_only_one_side_is_a_single_cluster() -> None:
    gen = torch.Generator().manual_seed(4)
    varied = _labels(gen, (1, 40), 4)
    single = torch.zeros(1, 40, dtype=torch.long)
    assert ari(single, varied).item() == pytest.approx(0.0, abs=1e-12)
    assert ari(varied, single).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("n", [0, 1])
def test_ari_is_one_with_fewer_than_two_points(n: int) -> None:
    true, pred = torch.zeros(2, n, dtype=torch.long), torch.ones(2, n, dtype=torch.long)
    assert ari(true, pred).tolist() == [1.0, 1.0]


def test_ari_is_one_under_label_permutation() -> None:
    gen = torch.Generator().manual_seed(5)
    true = _labels(gen, (3, 200), 6)
    perm = torch.randperm(6, generator=gen)
    assert ari(true, perm[true] + 50).tolist() == [1.0, 1.0, 1.0]


def test_ari_of_independent_random_labels_is_near_zero() -> None:
    gen = torch.Generator().manual_seed(6)
    true, pred = _labels(gen, (8, 20000), 5), _labels(gen, (8, 20000), 7)
    got = ari(true, pred)
    assert got.abs().max().item() < 5e-3
    assert got.abs().max().item() > 0  # not a constant: a chance-level value, both signs possible


def test_ari_is_symmetric_and_can_be_negative() -> None:
    # the chequerboard against stripes disagrees more than chance
    true = torch.tensor([[0, 0, 1, 1]])
    pred = torch.tensor([[0, 1, 0, 1]])
    assert ari(true, pred).item() == pytest.approx(ari_pairs_loop([0, 0, 1, 1], [0, 1, 0, 1]))
    assert ari(true, pred).item() < 0
    gen = torch.Generator().manual_seed(7)
    a, b = _labels(gen, (4, 60), 3), _labels(gen, (4, 60), 5)
    torch.testing.assert_close(ari(a, b), ari(b, a), rtol=0, atol=1e-15)


def test_ari_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        ari(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="valid"):
        ari(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 4).bool())


# ---------------------------------------------------------------- VideoARI / FG-ARI


def test_video_ari_matches_loop_reference() -> None:
    gen = torch.Generator().manual_seed(8)
    true = _labels(gen, (3, 3, 5, 6), 4)  # 0 = background
    true[1] = 0  # a video without foreground
    pred = _labels(gen, (3, 3, 5, 6), 5)
    pred[2] = true[2] + 3  # a perfect (relabelled) prediction
    for foreground_only in (False, True):
        got = video_ari(true, pred, foreground_only=foreground_only)
        expected = [video_ari_loop(true[b].tolist(), pred[b].tolist(), foreground_only) for b in range(3)]
        torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    assert video_ari(true, pred, foreground_only=True)[1].item() == 1.0  # no foreground: degenerate -> 1


def test_video_ari_penalises_slots_that_swap_objects_between_frames() -> None:
    true = torch.zeros(1, 2, 4, 4, dtype=torch.long)
    true[..., :2, :] = 1
    true[..., 2:, :2] = 2
    pred = true.clone()
    pred[0, 1] = torch.tensor([0, 2, 1])[true[0, 1]]  # frame 1: the slots of objects 1 and 2 swap
    per_frame = ari(true.flatten(2)[0], pred.flatten(2)[0])  # each frame alone is perfect
    assert per_frame.tolist() == [1.0, 1.0]
    for foreground_only in (False, True):
        got = video_ari(true, pred, foreground_only=foreground_only).item()
        assert got == pytest.approx(video_ari_loop(true[0].tolist(), pred[0].tolist(), foreground_only))
        assert got < 0.5


def test_fg_ari_ignores_how_the_background_is_split() -> None:
    gen = torch.Generator().manual_seed(9)
    true = _labels(gen, (2, 2, 8, 8), 3)
    pred = true.clone()
    background = true == 0
    pred[background] = _labels(gen, (int(background.sum()),), 4) + 1  # background merged into objects
    assert video_ari(true, pred, foreground_only=True).tolist() == [1.0, 1.0]
    assert (video_ari(true, pred) < 0.9).all()


def test_video_metrics_reject_bad_shapes() -> None:
    a = torch.zeros(2, 3, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\(B, T, H, W\)"):
        video_ari(a, a[:, :2])
    with pytest.raises(ValueError, match=r"\(B, T, H, W\)"):
        mbo(a.flatten(2), a.flatten(2))
    with pytest.raises(ValueError, match="empty"):
        mbo(a[:, :0], a[:, :0])


# ---------------------------------------------------------------- mBO


def test_mbo_on_hand_made_masks_with_known_ious() -> None:
    # one 4x4 frame; object 1 = top-left 2x2 (4 px), object 2 = bottom row (4 px)
    true = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    true[0, 0, :2, :2] = 1
    true[0, 0, 3, :] = 2
    pred = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    pred[0, 0, :2, :3] = 5  # covers object 1 plus 2 background px: IoU 4/6
    pred[0, 0, 2:, :2] = 6  # 2 px of object 2 plus 2 background px: IoU 2/6 (vs 2/10 for label 0)
    # label 0 (the rest): 2 px of object 2 out of its 6 px: IoU with object 2 = 2 / (4 + 6 - 2) = 1/4
    got = mbo(true, pred)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx((4 / 6 + 2 / 6) / 2, abs=1e-15)
    assert got.item() == pytest.approx(mbo_loop(true[0].tolist(), pred[0].tolist()))


def test_mbo_is_over_the_video_volume_not_per_frame() -> None:
    # object 1 sits in the same place in 2 frames; the prediction gives it segment 1 then segment 2
    true = torch.zeros(1, 2, 2, 2, dtype=torch.long)
    true[0, :, 0, :] = 1
    pred = torch.zeros(1, 2, 2, 2, dtype=torch.long)
    pred[0, 0, 0, :] = 1
    pred[0, 1, 0, :] = 2
    # per frame the IoU would be 1; over the volume each segment covers half the object: 2 / 4
    assert mbo(true, pred).item() == pytest.approx(0.5)


def test_mbo_perfect_prediction_and_absent_objects() -> None:
    true = torch.zeros(2, 2, 4, 4, dtype=torch.long)
    true[0, :, :2, :2] = 3  # ids need not be 1..K; id 1 and 2 never occur and are not objects
    true[0, 1, 3, 3] = 7
    pred = true * 10 + 1  # any relabelling
    got = mbo(true, pred)
    assert got[0].item() == 1.0
    assert math.isnan(got[1].item())  # no objects at all: no mBO (skipped with nanmean)


def test_mbo_matches_loop_reference() -> None:
    gen = torch.Generator().manual_seed(10)
    true = _labels(gen, (4, 3, 5, 5), 5, values=[0, 0, 1, 4, 9])
    pred = _labels(gen, (4, 3, 5, 5), 6)
    pred[0] = torch.where(torch.rand(3, 5, 5, generator=gen) < 0.7, true[0], pred[0])  # partly right
    got = mbo(true, pred)
    expected = [mbo_loop(true[b].tolist(), pred[b].tolist()) for b in range(4)]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    assert got[0].item() > got[1:].max().item()


def test_mbo_with_the_background_as_an_object() -> None:
    # the hand example above; background (8 px) vs the prediction's label 0 (6 px): 4 shared, IoU 4/10,
    # its best (label 5: 2/12, label 6: 2/10)
    true = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    true[0, 0, :2, :2] = 1
    true[0, 0, 3, :] = 2
    pred = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    pred[0, 0, :2, :3] = 5
    pred[0, 0, 2:, :2] = 6
    got = mbo(true, pred, include_background=True).item()
    assert got == pytest.approx((4 / 6 + 2 / 6 + 4 / 10) / 3, abs=1e-15)
    assert got == pytest.approx(mbo_loop(true[0].tolist(), pred[0].tolist(), include_background=True))
    only_background = torch.zeros(1, 1, 2, 2, dtype=torch.long)
    assert math.isnan(mbo(only_background, only_background).item())
    assert mbo(only_background, only_background, include_background=True).item() == 1.0


def test_hungarian_miou_matches_each_segment_to_one_object() -> None:
    # objects 1 (2 px) and 2 (4 px); segment 7 covers 5 px. Both objects' best segment is 7 (IoU 2/5 and
    # 3/6), so mBO = 0.45; one-to-one, 1 -> 7 and 2 -> 8 (1/4) sum to 0.65 > 3/6 + 0: mIoU 0.325
    true = torch.tensor([1, 1, 2, 2, 2, 2]).view(1, 1, 1, 6)
    pred = torch.tensor([7, 7, 7, 7, 7, 8]).view(1, 1, 1, 6)
    assert mbo(true, pred).item() == pytest.approx(0.45, abs=1e-15)
    assert hungarian_miou(true, pred).item() == pytest.approx(0.325, abs=1e-15)
    # one segment for two objects: the better one takes it, the other scores 0
    single = torch.full_like(pred, 7)
    assert mbo(true, single).item() == pytest.approx(0.5, abs=1e-15)
    assert hungarian_miou(true, single).item() == pytest.approx((4 / 6) / 2, abs=1e-15)
    assert hungarian_miou(true, true + 1).item() == 1.0
    assert math.isnan(hungarian_miou(torch.zeros_like(true), pred).item())


def test_ignored_pixels_count_in_neither_partition() -> None:
    # pixel 2 is unlabelled (255): without it the prediction is perfect
    true = torch.tensor([1, 1, 255, 2]).view(1, 1, 1, 4)
    pred = torch.tensor([5, 5, 5, 6]).view(1, 1, 1, 4)
    for metric in (mbo, hungarian_miou):
        assert metric(true, pred, ignore_label=255).item() == 1.0
        assert metric(true, pred).item() < 0.9  # 255 read as an object, and segment 5 grown by a pixel
    assert video_ari(true, pred, ignore_label=255).item() == 1.0
    assert video_ari(true, pred, foreground_only=True, ignore_label=255).item() == 1.0
    assert video_ari(true, pred).item() < 0.9


def test_mbo_miou_and_ari_options_match_loop_references() -> None:
    gen = torch.Generator().manual_seed(12)
    true = _labels(gen, (4, 2, 3, 4), 5, values=[0, 0, 2, 3, 99])  # 99: unlabelled
    pred = _labels(gen, (4, 2, 3, 4), 4)
    pred[0] = torch.where(torch.rand(2, 3, 4, generator=gen) < 0.7, true[0], pred[0])
    for include_background in (False, True):
        for ignore_label in (None, 99):
            kw = dict(include_background=include_background, ignore_label=ignore_label)
            for metric, loop in ((mbo, mbo_loop), (hungarian_miou, hungarian_miou_loop)):
                got = metric(true, pred, **kw)
                expected = [loop(true[b].tolist(), pred[b].tolist(), **kw) for b in range(4)]
                torch.testing.assert_close(
                    got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12
                )
                assert (hungarian_miou(true, pred, **kw) <= mbo(true, pred, **kw) + 1e-12).all()
    for foreground_only in (False, True):
        got = video_ari(true, pred, foreground_only=foreground_only, ignore_label=99)
        expected = [video_ari_loop(true[b].tolist(), pred[b].tolist(), foreground_only, 99) for b in range(4)]
        torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- hard masks and baselines


def test_masks_to_labels_upsamples_then_takes_the_argmax() -> None:
    gen = torch.Generator().manual_seed(11)
    low = _labels(gen, (2, 3, 4, 4), 5)  # (B, T, h, w) patch labels
    soft = F.one_hot(low, 5).permute(0, 1, 4, 2, 3).float()  # (B, T, K, h, w)
    assert torch.equal(masks_to_labels(soft, (4, 4)), low)
    # at 2x, each pixel's nearest patch has the largest bilinear weight (9/16)
    up = low.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
    assert torch.equal(masks_to_labels(soft, (8, 8)), up)


@pytest.mark.parametrize("bad", [-0.25, 1.5, math.nan])
def test_masks_to_labels_refuses_values_outside_0_1(bad: float) -> None:
    soft = torch.full((1, 1, 2, 2, 2), 0.5)
    soft[0, 0, 1, 1, 1] = bad
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        masks_to_labels(soft, (4, 4))


def test_random_blob_baseline_is_seeded_static_and_in_range() -> None:
    true = torch.zeros(3, 4, 16, 16, dtype=torch.long)
    a = random_mask_baseline(true, 5, torch.Generator().manual_seed(0))
    b = random_mask_baseline(true, 5, torch.Generator().manual_seed(0))
    c = random_mask_baseline(true, 5, torch.Generator().manual_seed(1))
    assert a.shape == true.shape and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.min()) >= 0 and int(a.max()) <= 4
    assert (a == a[:, :1]).all()  # constant over time
    assert not torch.equal(a[0], a[1])  # a new partition per video
    assert all(len(a[i].unique()) >= 3 for i in range(3))  # blobs, not one segment


def test_grid_baseline_uses_every_label_once_per_block() -> None:
    true = torch.zeros(2, 2, 12, 12, dtype=torch.long)
    grid = random_mask_baseline(true, 6, kind="grid")  # 2 rows x 3 cols of 6x4 blocks
    assert grid[0, 0, 0].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert grid[0, 0, 11].tolist() == [3] * 4 + [4] * 4 + [5] * 4
    assert torch.equal(grid[0], grid[1])
    assert random_mask_baseline(true, 7, kind="grid").unique().tolist() == list(range(7))
    with pytest.raises(ValueError, match="kind"):
        random_mask_baseline(true, 3, kind="stripes")


def test_baselines_score_below_a_perfect_prediction_on_synthetic_videos() -> None:
    from core.data.multi_object import batch_videos, make_object_videos

    _, true = batch_videos(make_object_videos(num_videos=8, frames=4, image_size=32, seed=0))
    blobs = random_mask_baseline(true, 7, torch.Generator().manual_seed(0))
    grid = random_mask_baseline(true, 7, kind="grid")
    for pred in (blobs, grid):
        assert video_ari(true, pred, foreground_only=True).mean().item() < 0.6
        assert torch.nanmean(mbo(true, pred)).item() < 0.6
    assert video_ari(true, true, foreground_only=True).tolist() == [1.0] * 8
    assert mbo(true, true).tolist() == [1.0] * 8


def test_label_values_are_only_names() -> None:
    """Small ids index the table directly, large/negative ones are renumbered: both give the same scores."""
    gen = torch.Generator().manual_seed(12)
    true = _labels(gen, (3, 2, 6, 6), 4)
    pred = _labels(gen, (3, 2, 6, 6), 5)
    for foreground_only in (False, True):
        expected = video_ari(true, pred, foreground_only)
        torch.testing.assert_close(
            video_ari(true * 70000, pred - 3, foreground_only), expected, rtol=0, atol=0
        )
        torch.testing.assert_close(video_ari(true, pred * 40000, foreground_only), expected, rtol=0, atol=0)
    torch.testing.assert_close(mbo(true * 70000, pred * 40000 - 1), mbo(true, pred), rtol=0, atol=0)
