"""Unsupervised segmentation metrics for object-centric video models: ARI, VideoARI / FG-ARI, mBO and
Hungarian-matched mIoU.

All of them compare two partitions of the same points through one contingency table per row, built
with a single `scatter_add` over every point of the batch. Labels are arbitrary integers: a prediction
is a partition (slot ids), so only which points share a label matters, never the label values. In
the true masks 0 is background. A true label equal to `ignore_label` marks an unlabelled pixel: it is
dropped from both partitions, as the reference (martius-lab/slotcontrast) drops pixels without a true
class from ARI and zeroes ignored pixels in both masks for IoU.

Per video, the points are all pixels of all frames (one clustering of the whole volume), so a slot
that switches objects between frames is penalised: that is what makes these video metrics.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

# Label ranges whose product stays below this are used as they are (no sort); else they are renumbered.
_DIRECT_TABLE_SIZE = 1 << 16


def _dense_labels(labels: Tensor, other_range: int) -> tuple[Tensor, Tensor]:
    """Labels as ids in [0, C) and the label value of each id (C,).

    Small non-negative labels (slot ids, object ids) are their own ids, which skips a sort of every
    point; anything else (negative, sparse palette or 16-bit ids) is renumbered over the whole batch
    with `torch.unique`, so the contingency table never grows with the label values.
    """
    if labels.numel() > 0:
        low, high = (int(v) for v in torch.aminmax(labels))
        if low >= 0 and (high + 1) * other_range <= _DIRECT_TABLE_SIZE:
            return labels, torch.arange(high + 1, device=labels.device)
    values, ids = torch.unique(labels, return_inverse=True)
    return ids, values


def _contingency(true: Tensor, pred: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-row contingency tables (B, Ct, Cp) int64 and the true label value of each table row (Ct,).

    One `scatter_add` over all points of the batch; ids of labels absent from a row count 0, points
    with `valid` False are not counted.
    """
    p, pred_values = _dense_labels(pred, 1)  # (B, N) ids in [0, Cp)
    t, true_values = _dense_labels(true, pred_values.numel())  # (B, N) ids in [0, Ct)
    n_true, n_pred = true_values.numel(), pred_values.numel()
    counts = torch.ones_like(t) if valid is None else valid.to(torch.long)
    table = torch.zeros(true.shape[0], n_true * n_pred, dtype=torch.long, device=true.device)
    table.scatter_add_(1, t * n_pred + p, counts)
    return table.view(true.shape[0], n_true, n_pred), true_values


def _pairs(n: Tensor) -> Tensor:
    """Number of unordered pairs among n points, exact in int64."""
    return n * (n - 1) // 2


def ari(true: Tensor, pred: Tensor, valid: Tensor | None = None) -> Tensor:
    """Adjusted Rand index (B,) float64 between two labelings (B, N) of the same N points per row.

    `valid` (B, N) bool drops points from both labelings (FG-ARI passes `true != 0`).
    ARI = (I - E) / (M - E) with I = sum_ij C(n_ij, 2), a_i / b_j the row / column sums,
    E = sum_i C(a_i, 2) * sum_j C(b_j, 2) / C(n, 2) and M = (sum_i C(a_i, 2) + sum_j C(b_j, 2)) / 2.
    The denominator M - E is 0 exactly when both labelings put all points in one cluster, or both put
    every point in a cluster of its own (which includes rows with fewer than 2 valid points, e.g. no
    foreground pixel for FG-ARI); the ARI is then 1.0 (the standard convention, as in slots.md).
    Pair counts are exact int64, the degenerate case is decided on them, the ratio is float64.
    """
    if true.shape != pred.shape or true.ndim != 2:
        raise ValueError(
            f"ari: true and pred must both be (B, N), got {tuple(true.shape)} and {tuple(pred.shape)}"
        )
    if valid is not None and valid.shape != true.shape:
        raise ValueError(f"ari: valid must be {tuple(true.shape)}, got {tuple(valid.shape)}")
    table, _ = _contingency(true, pred, valid)  # (B, Ct, Cp)
    index = _pairs(table).sum(dim=(1, 2))  # (B,) pairs together in both
    sum_a = _pairs(table.sum(dim=2)).sum(dim=1)  # pairs together in true
    sum_b = _pairs(table.sum(dim=1)).sum(dim=1)  # pairs together in pred
    total = _pairs(table.sum(dim=(1, 2)))
    degenerate = (sum_a == sum_b) & ((sum_a == 0) | (sum_a == total))
    index, sum_a, sum_b, total = (x.to(torch.float64) for x in (index, sum_a, sum_b, total))
    expected = sum_a * sum_b / total.clamp(min=1)
    denominator = (sum_a + sum_b) / 2 - expected
    value = (index - expected) / torch.where(degenerate, 1.0, denominator)
    return torch.where(degenerate, 1.0, value)


def _check_video_masks(true_masks: Tensor, pred_masks: Tensor) -> None:
    if true_masks.shape != pred_masks.shape or true_masks.ndim != 4:
        raise ValueError(
            "true_masks and pred_masks must both be (B, T, H, W) label maps, "
            f"got {tuple(true_masks.shape)} and {tuple(pred_masks.shape)}"
        )
    if true_masks[0].numel() == 0:
        raise ValueError(f"masks are empty: {tuple(true_masks.shape)}")


def _labelled(true: Tensor, ignore_label: int | None) -> Tensor | None:
    """Points that carry a true label (None: all of them)."""
    return None if ignore_label is None else true != ignore_label


def video_ari(
    true_masks: Tensor, pred_masks: Tensor, foreground_only: bool = False, ignore_label: int | None = None
) -> Tensor:
    """VideoARI (or FG-ARI with `foreground_only`) per video (B,): all T*H*W points as one clustering.

    FG-ARI scores only pixels whose true label is not 0, so how the background is split does not count;
    a video with no foreground pixel scores 1.0 (see `ari`). Pixels labelled `ignore_label` are skipped.
    """
    _check_video_masks(true_masks, pred_masks)
    true = true_masks.flatten(1)  # (B, T*H*W)
    valid = _labelled(true, ignore_label)
    if foreground_only:
        valid = true != 0 if valid is None else valid & (true != 0)
    return ari(true, pred_masks.flatten(1), valid=valid)


def _object_ious(
    true_masks: Tensor, pred_masks: Tensor, include_background: bool, ignore_label: int | None
) -> tuple[Tensor, Tensor]:
    """Whole-volume IoU of every true label with every predicted segment (B, Ct, Cp) float64, and which
    true labels are objects scored in each video (B, Ct): present, not ignored, not 0 unless
    `include_background`. A segment's union with an object counts all its labelled pixels."""
    _check_video_masks(true_masks, pred_masks)
    true = true_masks.flatten(1)
    table, true_values = _contingency(true, pred_masks.flatten(1), _labelled(true, ignore_label))
    true_size = table.sum(dim=2, keepdim=True)  # (B, Ct, 1)
    pred_size = table.sum(dim=1, keepdim=True)  # (B, 1, Cp)
    iou = table.to(torch.float64) / (true_size + pred_size - table).clamp(min=1)
    counted = torch.ones_like(true_values, dtype=torch.bool)
    if not include_background:
        counted &= true_values != 0
    if ignore_label is not None:
        counted &= true_values != ignore_label
    return iou, (true_size.squeeze(2) > 0) & counted[None, :]


def _mean_over_objects(per_object: Tensor, is_object: Tensor) -> Tensor:
    """(B, Ct) scores -> (B,) mean over each video's objects; NaN without objects (skip with nanmean,
    as the reference skips such samples)."""
    n_objects = is_object.sum(dim=1)
    return torch.where(n_objects > 0, (per_object * is_object).sum(dim=1) / n_objects.clamp(min=1), torch.nan)


def mbo(
    true_masks: Tensor,
    pred_masks: Tensor,
    include_background: bool = False,
    ignore_label: int | None = None,
) -> Tensor:
    """Mean best overlap per video (B,) float64: each true object's best IoU with any predicted segment.

    Objects are the non-zero true labels present in the video (and label 0 too with
    `include_background`, the reference's YTVIS setting `ignore_background: false`); IoU is over the
    whole video volume (one predicted segment must cover an object in every frame), as SlotContrast's
    VideoIoU with 'overlap' matching. A video without any object has no mBO: NaN.
    """
    iou, is_object = _object_ious(true_masks, pred_masks, include_background, ignore_label)
    return _mean_over_objects(iou.max(dim=2).values, is_object)


def hungarian_miou(
    true_masks: Tensor,
    pred_masks: Tensor,
    include_background: bool = False,
    ignore_label: int | None = None,
) -> Tensor:
    """Mean IoU per video (B,) float64 under a one-to-one matching of objects to predicted segments.

    Unlike mBO, two objects cannot both claim one segment: the matching maximises the summed IoU
    (scipy's `linear_sum_assignment`, as the reference's VideoIoU with 'hungarian' matching); an object
    left without a segment scores 0. Objects, volume IoU and NaN as in `mbo`."""
    iou, is_object = _object_ious(true_masks, pred_masks, include_background, ignore_label)
    matched = torch.zeros(is_object.shape, dtype=torch.float64)
    for b, (scores, objects) in enumerate(zip(iou.cpu().numpy(), is_object.cpu().numpy(), strict=True)):
        rows = np.flatnonzero(objects)
        r, c = linear_sum_assignment(scores[rows], maximize=True)
        matched[b, rows[r]] = torch.from_numpy(scores[rows[r], c])
    return _mean_over_objects(matched.to(iou.device), is_object)


def masks_to_labels(soft_masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Hard label maps (B, T, H, W) from soft slot masks (B, T, K, h, w): bilinear resize to `size`, argmax.

    The decoder predicts masks per patch; metrics compare them with full-resolution ground truth, so
    they are upsampled first (slots.md) and each pixel is given to its most likely slot. Masks outside
    [0, 1] are refused, as the reference's soft_to_hard_mask does: they are not masks (e.g. logits).
    """
    if soft_masks.ndim != 5:
        raise ValueError(f"soft_masks must be (B, T, K, h, w), got {tuple(soft_masks.shape)}")
    if soft_masks.numel():
        low, high = (float(v) for v in torch.aminmax(soft_masks))
        if not (low >= 0.0 and high <= 1.0):  # also refuses NaN
            raise ValueError(f"soft_masks must lie in [0, 1], found values in [{low}, {high}]")
    B, T = soft_masks.shape[:2]
    resized = F.interpolate(soft_masks.flatten(0, 1).float(), size=size, mode="bilinear", align_corners=False)
    return resized.argmax(dim=1).view(B, T, *size)  # (B, T, H, W)


def random_mask_baseline(
    true_masks: Tensor, num_slots: int, generator: torch.Generator | None = None, kind: str = "blobs"
) -> Tensor:
    """Trivial predictions (B, T, H, W) with `num_slots` segments, constant over time, for a baseline row.

    `blobs`: a random Voronoi partition per video (nearest of `num_slots` uniform random centres), i.e.
    random compact blobs that ignore the content. `grid`: the same rows x cols blocks for every video
    (rows = floor(sqrt(K)), cols = ceil(K / rows); blocks beyond K merge into the last label); the
    generator is not used. A model must beat both to show it found objects rather than locality.
    """
    if num_slots < 1:
        raise ValueError(f"num_slots must be >= 1, got {num_slots}")
    if true_masks.ndim != 4:
        raise ValueError(f"true_masks must be (B, T, H, W), got {tuple(true_masks.shape)}")
    B, T, H, W = true_masks.shape
    device = true_masks.device
    if kind == "blobs":
        gen_device = generator.device if generator is not None else torch.device("cpu")
        centres = torch.rand(B, num_slots, 2, generator=generator, device=gen_device).to(device)  # (B, K, 2)
        ys = (torch.arange(H, device=device) + 0.5) / H
        xs = (torch.arange(W, device=device) + 0.5) / W
        dy2 = (ys.view(1, 1, H, 1) - centres[..., 0].view(B, num_slots, 1, 1)) ** 2  # (B, K, H, 1)
        dx2 = (xs.view(1, 1, 1, W) - centres[..., 1].view(B, num_slots, 1, 1)) ** 2  # (B, K, 1, W)
        labels = (dy2 + dx2).argmin(dim=1, keepdim=True)  # (B, 1, H, W) nearest centre
    elif kind == "grid":
        rows = max(1, int(num_slots**0.5))
        cols = -(-num_slots // rows)
        row = torch.arange(H, device=device) * rows // H
        col = torch.arange(W, device=device) * cols // W
        labels = (row[:, None] * cols + col[None, :]).clamp(max=num_slots - 1).expand(B, 1, H, W)
    else:
        raise ValueError(f"kind must be 'blobs' or 'grid', got {kind!r}")
    return labels.expand(B, T, H, W).contiguous()
