"""Slow references for the segmentation metrics, written from the definitions with plain Python loops.

Two independent ARI computations: pair counting over every pair of points (the definition of the Rand
index, O(N^2), tiny inputs only) and a contingency table filled point by point with exact rational
arithmetic. Both use the convention that ARI is 1.0 when its denominator is 0.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction


def _adjusted(index: int, sum_a: int, sum_b: int, total: int) -> float:
    expected = Fraction(sum_a * sum_b, total) if total else Fraction(0)
    denominator = Fraction(sum_a + sum_b, 2) - expected
    if denominator == 0:
        return 1.0
    return float((index - expected) / denominator)


def ari_pairs_loop(true: Sequence[int], pred: Sequence[int]) -> float:
    """ARI by visiting every unordered pair of points once."""
    n = len(true)
    both = same_true = same_pred = 0
    for i in range(n):
        for j in range(i + 1, n):
            t = true[i] == true[j]
            p = pred[i] == pred[j]
            both += t and p
            same_true += t
            same_pred += p
    return _adjusted(both, same_true, same_pred, n * (n - 1) // 2)


def ari_contingency_loop(true: Sequence[int], pred: Sequence[int]) -> float:
    """ARI from a contingency table counted point by point, pair counts by math.comb."""
    table: Counter[tuple[int, int]] = Counter()
    rows: Counter[int] = Counter()
    cols: Counter[int] = Counter()
    for t, p in zip(true, pred, strict=True):
        table[(t, p)] += 1
        rows[t] += 1
        cols[p] += 1
    index = sum(math.comb(c, 2) for c in table.values())
    sum_a = sum(math.comb(c, 2) for c in rows.values())
    sum_b = sum(math.comb(c, 2) for c in cols.values())
    return _adjusted(index, sum_a, sum_b, math.comb(len(true), 2))


def _flatten(video: Sequence[Sequence[Sequence[int]]]) -> list[int]:
    """(T, H, W) nested lists -> the T*H*W labels in frame, row, column order."""
    return [label for frame in video for row in frame for label in row]


def _kept(
    true: Sequence[Sequence[Sequence[int]]], pred: Sequence[Sequence[Sequence[int]]], ignore_label: int | None
) -> tuple[list[int], list[int]]:
    """Flattened labels without the unlabelled (ignored) pixels, which count in neither partition."""
    t, p = _flatten(true), _flatten(pred)
    keep = [i for i in range(len(t)) if ignore_label is None or t[i] != ignore_label]
    return [t[i] for i in keep], [p[i] for i in keep]


def video_ari_loop(
    true: Sequence[Sequence[Sequence[int]]],
    pred: Sequence[Sequence[Sequence[int]]],
    foreground_only: bool,
    ignore_label: int | None = None,
) -> float:
    """VideoARI / FG-ARI of one video: all pixels of all frames as one clustering."""
    t, p = _kept(true, pred, ignore_label)
    if foreground_only:
        keep = [i for i in range(len(t)) if t[i] != 0]
        t, p = [t[i] for i in keep], [p[i] for i in keep]
    return ari_contingency_loop(t, p)


def _iou_table(
    true: Sequence[Sequence[Sequence[int]]],
    pred: Sequence[Sequence[Sequence[int]]],
    include_background: bool,
    ignore_label: int | None,
) -> list[list[float]]:
    """IoU over the video of every object (rows: true labels present, 0 only with include_background)
    with every predicted label, pixel by pixel."""
    t, p = _kept(true, pred, ignore_label)
    objects = sorted({label for label in t if include_background or label != 0})
    rows = []
    for obj in objects:
        row = []
        for seg in sorted(set(p)):
            inter = union = 0
            for i in range(len(t)):
                in_t, in_p = t[i] == obj, p[i] == seg
                inter += in_t and in_p
                union += in_t or in_p
            row.append(inter / union)
        rows.append(row)
    return rows


def mbo_loop(
    true: Sequence[Sequence[Sequence[int]]],
    pred: Sequence[Sequence[Sequence[int]]],
    include_background: bool = False,
    ignore_label: int | None = None,
) -> float:
    """Mean over true objects of the best IoU with any predicted label, whole video."""
    rows = _iou_table(true, pred, include_background, ignore_label)
    if not rows:
        return math.nan
    return sum(max(row) for row in rows) / len(rows)


def hungarian_miou_loop(
    true: Sequence[Sequence[Sequence[int]]],
    pred: Sequence[Sequence[Sequence[int]]],
    include_background: bool = False,
    ignore_label: int | None = None,
) -> float:
    """Mean IoU under the best one-to-one matching, by trying every assignment of objects to distinct
    segments (objects beyond the number of segments score 0). Tiny inputs only."""
    rows = _iou_table(true, pred, include_background, ignore_label)
    if not rows:
        return math.nan
    n_obj, n_seg = len(rows), len(rows[0])
    slots = list(range(n_seg)) + [None] * n_obj  # None: the object gets no segment
    best = max(
        sum(rows[o][s] for o, s in enumerate(choice) if s is not None)
        for choice in itertools.permutations(slots, n_obj)
    )
    return best / n_obj
