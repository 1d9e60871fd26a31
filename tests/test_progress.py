"""Progress ground truth, metrics, segment sampler and both progress losses (heads: test_progress_heads)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from core.data.video import Video
from core.losses.progress import cumulative_l2_progress_loss, learnable_progress_loss, sample_action_segments
from core.metrics.progress import (
    EARLY,
    END,
    MID,
    action_cumulative_progress,
    calibration_bins,
    cumulative_distance,
    monotonicity,
    ogpe,
    relative_position,
    true_progress,
    true_progress_per_action,
    window_mean,
)
from core.metrics.progress_eval import METRIC_NAMES, ProgressEvaluator
from core.models.progress_head import ProgressHead
from core.train.plots import plot_calibration
from tests.reference.progress import (
    action_position_stats_loop,
    action_progress_normalised_loop,
    cumulative_distance_loop,
    cumulative_l2_loss_loop,
    learnable_progress_loss_loop,
    ogpe_loop,
    predict_online_loop,
    seed_action_progress,
    true_progress_loop,
    true_progress_per_action_loop,
)
from tests.test_progress_heads import make_head

# background at the start ('0'), in the middle ('SIL') and at the end ('background')
TIMES = {
    "step": ["0", "a", "SIL", "b", "background"],
    "start_frame": [0, 2, 6, 8, 10],
    "end_frame": [1, 5, 7, 9, 11],
    "name": "hand",
}
LOSS_HEADS = [  # (kind, position_encoding A, learnable start B)
    ("gru", False, False),
    ("gru", True, True),
    ("mean", True, False),
    ("transformer", True, True),
    ("dilated_conv", False, True),
]


def random_times(rng: np.random.Generator, T: int, max_len: int = 12) -> dict:
    """Contiguous segments covering 0..T-1 with a mix of background and action labels."""
    cuts = [0]
    while cuts[-1] < T:
        cuts.append(min(T, cuts[-1] + int(rng.integers(1, max_len + 1))))
    labels = [str(rng.choice(["SIL", "0", "background", "x", "y", "z"])) for _ in range(len(cuts) - 1)]
    return {"step": labels, "start_frame": cuts[:-1], "end_frame": [c - 1 for c in cuts[1:]], "name": "r"}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------- metrics
def test_true_progress_hand_example() -> None:
    # K = 2: 'a' (4 frames) is linspace(0, 1/2, 4), 'b' (2 frames) linspace(1/2, 1, 2); background holds
    expected = [0, 0, 0, 1 / 6, 1 / 3, 0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 1.0]
    torch.testing.assert_close(true_progress(TIMES, 12, dtype=torch.float64), torch.tensor(expected).double())
    torch.testing.assert_close(true_progress_loop(TIMES, 12), torch.tensor(expected).double())
    completed = [0, 0, 0.125, 0.25, 0.375, 0.5, 0.5, 0.5, 0.75, 1.0, 1.0, 1.0]  # the earlier definition
    got = true_progress(TIMES, 12, definition="completed_frames", dtype=torch.float64)
    torch.testing.assert_close(got, torch.tensor(completed).double())
    with pytest.raises(ValueError, match="definition"):
        true_progress(TIMES, 12, definition="linear")


# back-to-back actions, a one-frame action ('b') and background between actions; K = 4
BACK_TO_BACK = {
    "step": ["a", "b", "c", "SIL", "d"],
    "start_frame": [0, 3, 4, 6, 7],
    "end_frame": [2, 3, 5, 6, 9],
    "name": "b2b",
}
# the same video as the release's JSON stores it: each segment ends on the next one's first frame
SHARED = {**BACK_TO_BACK, "end_frame": [3, 4, 6, 7, 9]}


def test_true_progress_back_to_back_and_one_frame_actions() -> None:
    # a: linspace(0, .25, 3); b: linspace(.25, .5, 1) = [.25] (stays at prev); c: linspace(.5, .75, 2);
    # SIL holds .75; d: linspace(.75, 1, 3)
    release = [0, 0.125, 0.25, 0.25, 0.5, 0.75, 0.75, 0.75, 0.875, 1.0]
    got = true_progress(BACK_TO_BACK, 10, dtype=torch.float64)
    torch.testing.assert_close(got, torch.tensor(release).double())
    torch.testing.assert_close(true_progress_loop(BACK_TO_BACK, 10), torch.tensor(release).double())
    completed = [1 / 12, 2 / 12, 3 / 12, 0.5, 0.625, 0.75, 0.75, 5 / 6, 11 / 12, 1.0]
    got = true_progress(BACK_TO_BACK, 10, definition="completed_frames", dtype=torch.float64)
    torch.testing.assert_close(got, torch.tensor(completed).double())


def test_ground_truth_on_a_release_record_with_shared_boundary_frames() -> None:
    # the release writes the segments in order: a = linspace(0, .25, 4) on 0..3, then b overwrites
    # frame 3 with .25 and writes .5 on 4, c overwrites 4 with .5 (.625, .75 on 5, 6), SIL copies
    # frame 5 onto 6..7, d writes .75, .875, 1 on 7..9
    release = [0, 1 / 12, 2 / 12, 0.25, 0.5, 0.625, 0.625, 0.75, 0.875, 1.0]
    torch.testing.assert_close(true_progress(SHARED, 10, dtype=torch.float64), torch.tensor(release).double())
    torch.testing.assert_close(true_progress_loop(SHARED, 10), torch.tensor(release).double())
    # per action (the fork's arange(1, L + 1) / L over the declared L, the later segment owning the frame)
    per_action = [0.25, 0.5, 0.75, 0.5, 1 / 3, 2 / 3, 0, 1 / 3, 2 / 3, 1.0]
    got = true_progress_per_action(SHARED, 10, dtype=torch.float64)
    torch.testing.assert_close(got, torch.tensor(per_action).double())
    torch.testing.assert_close(true_progress_per_action_loop(SHARED, 10), torch.tensor(per_action).double())
    overlapping = {**SHARED, "end_frame": [4, 4, 6, 7, 9]}  # 'a' runs past 'b''s first frame
    with pytest.raises(ValueError, match="shared boundary frame"):
        true_progress(overlapping, 10)


def test_true_progress_per_action_hand_example() -> None:
    expected = [0, 0, 0.25, 0.5, 0.75, 1.0, 0, 0, 0.5, 1.0, 0, 0]
    got = true_progress_per_action(TIMES, 12, dtype=torch.float64)
    torch.testing.assert_close(got, torch.tensor(expected).double())
    torch.testing.assert_close(true_progress_per_action_loop(TIMES, 12), torch.tensor(expected).double())


@pytest.mark.parametrize("seed", range(8))
def test_ground_truth_matches_loop_on_random_annotations(seed: int) -> None:
    rng = np.random.default_rng(seed)
    T = int(rng.integers(1, 80))
    times = random_times(rng, T)
    for definition in ("release", "completed_frames"):
        got = true_progress(times, T, definition=definition, dtype=torch.float64)
        torch.testing.assert_close(got, true_progress_loop(times, T, definition))
    torch.testing.assert_close(
        true_progress_per_action(times, T, dtype=torch.float64), true_progress_per_action_loop(times, T)
    )
    # as the release stores it: every segment but the last ends on the next one's first frame
    shared = {**times, "end_frame": [*times["start_frame"][1:], times["end_frame"][-1]]}
    torch.testing.assert_close(true_progress(shared, T, dtype=torch.float64), true_progress_loop(shared, T))
    torch.testing.assert_close(
        true_progress_per_action(shared, T, dtype=torch.float64), true_progress_per_action_loop(shared, T)
    )


def test_ground_truth_without_actions_is_zero() -> None:
    times = {"step": ["SIL", "0"], "start_frame": [0, 3], "end_frame": [2, 5], "name": "bg"}
    assert torch.equal(true_progress(times, 6), torch.zeros(6))
    assert torch.equal(true_progress_per_action(times, 6), torch.zeros(6))


def test_annotation_longer_than_video_is_clipped() -> None:
    long = {
        "step": ["a", "SIL", "b", "c"],
        "start_frame": [0, 4, 6, 10],
        "end_frame": [3, 5, 11, 13],
        "name": "l",
    }
    clipped = {"step": ["a", "SIL", "b"], "start_frame": [0, 4, 6], "end_frame": [3, 5, 8], "name": "l"}
    emb = torch.randn(9, 3, dtype=torch.float64)
    torch.testing.assert_close(true_progress_per_action(long, 9), true_progress_per_action(clipped, 9))
    torch.testing.assert_close(
        action_cumulative_progress(emb, long), action_cumulative_progress(emb, clipped)
    )


def test_ogpe_hand_example() -> None:
    pred, gt = torch.tensor([0.0, 0.5, 1.0]), torch.tensor([0.25, 0.5, 0.5])
    assert ogpe(pred, gt) == pytest.approx(0.25)
    # per-video means first: (0.25 + 0.5) / 2, not the frame-weighted 0.35
    preds, gts = [pred, torch.tensor([1.0, 1.0])], [gt, torch.tensor([0.0, 1.0])]
    assert ogpe(preds, gts) == pytest.approx(0.375)
    assert ogpe(preds, gts) == pytest.approx(ogpe_loop(preds, gts))
    with pytest.raises(ValueError):
        ogpe([pred], [torch.tensor([0.0, 1.0])])


def test_cumulative_distance_matches_loop_values_and_gradients() -> None:
    emb = torch.randn(30, 5, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(30, dtype=torch.float64)
    ours, ref = cumulative_distance(emb), cumulative_distance_loop(emb)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    g_ours = torch.autograd.grad((ours * weights).sum(), emb)[0]
    g_ref = torch.autograd.grad((ref * weights).sum(), emb)[0]
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-12)


def edge_case_video() -> tuple[torch.Tensor, dict]:
    """Background, a 1-frame action, a zero-distance action and ordinary actions."""
    times = {
        "step": ["SIL", "a", "b", "0", "c", "a", "background"],
        "start_frame": [0, 3, 4, 9, 11, 16, 22],
        "end_frame": [2, 3, 8, 10, 15, 21, 24],
        "name": "edge",
    }
    emb = torch.randn(25, 4, dtype=torch.float64)
    emb[11:16] = emb[11].clone()  # action 'c' never moves: zero final distance
    return emb.requires_grad_(True), times


def test_action_cumulative_progress_matches_seed_port() -> None:
    emb, times = edge_case_video()
    ours, ref = action_cumulative_progress(emb, times), seed_action_progress(emb, times)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    assert ours[3] == 0.5 and torch.all(ours[:3] == 0) and torch.all(ours[22:] == 0)
    torch.testing.assert_close(ours[11:16], torch.linspace(0, 1, 5, dtype=torch.float64))
    weights = torch.randn(25, dtype=torch.float64)
    g_ours = torch.autograd.grad((ours * weights).sum(), emb)[0]
    g_ref = torch.autograd.grad((ref * weights).sum(), emb)[0]
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_action_cumulative_progress_random_annotations(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    T = int(rng.integers(2, 90))
    times = random_times(rng, T)
    emb = torch.randn(T, 6, dtype=torch.float64, generator=gen(seed))
    torch.testing.assert_close(
        action_cumulative_progress(emb, times), seed_action_progress(emb, times), rtol=1e-12, atol=1e-12
    )


def test_action_cumulative_progress_with_normalisers() -> None:
    emb, times = edge_case_video()
    norms = {"a": 1.7, "b": 3.2, "c": 0.4}
    ours = action_cumulative_progress(emb, times, normalisers=norms)
    ref = action_progress_normalised_loop(emb, times, norms)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    assert ours[3] == 0  # a 1-frame action has travelled no distance yet
    weights = torch.randn(25, dtype=torch.float64)
    g_ours = torch.autograd.grad((ours * weights).sum(), emb)[0]
    g_ref = torch.autograd.grad((ref * weights).sum(), emb)[0]
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(KeyError):
        action_cumulative_progress(emb, times, normalisers={"a": 1.0})


# ---------------------------------------------------------------------------------------- sampler
SAMPLER_TIMES = {
    "step": ["SIL", "a", "b", "0", "c", "d", "background"],
    "start_frame": [0, 3, 5, 9, 11, 16, 18],
    "end_frame": [2, 4, 8, 10, 15, 17, 20],
    "name": "s",
}  # with min_segment_len=3 the valid actions are b (4 frames) and c (5 frames); a and d are too short


def seed_outcomes(times: dict, m: int) -> dict[tuple[int, int, int, int], float]:
    """Exact probability of every (action_start, seg_start, seg_end, target) under the seed's draws."""
    valid = [
        (s, e)
        for lab, s, e in zip(times["step"], times["start_frame"], times["end_frame"], strict=True)
        if lab not in ("SIL", "0", "background") and e - s + 1 >= m
    ]
    probs: dict[tuple[int, int, int, int], float] = {}
    for s, e in valid:
        max_start = max(s, e - m + 1)
        for a in range(s, max_start + 1):
            for b in range(a + m - 1, e + 1):
                for t in range(a, b + 1):
                    probs[(s, a, b, t)] = (
                        1 / len(valid) / (max_start - s + 1) / (e - (a + m - 1) + 1) / (b - a + 1)
                    )
    return probs


def test_sampler_obeys_seed_bounds_and_gt_formula() -> None:
    emb = torch.randn(21, 3, dtype=torch.float64)
    m = 3
    s = sample_action_segments(emb, SAMPLER_TIMES, k=4000, min_segment_len=m, generator=gen(0))
    assert s is not None and s.segments.shape[0] == 4000
    assert set(s.actions) == {"b", "c"}
    a_end = s.action_start + s.action_length - 1
    max_start = torch.maximum(s.action_start, a_end - m + 1)
    assert torch.all((s.action_start <= s.segment_start) & (s.segment_start <= max_start))
    assert torch.all((s.segment_start + m - 1 <= s.segment_end) & (s.segment_end <= a_end))
    assert torch.all((s.segment_start <= s.target_index) & (s.target_index <= s.segment_end))
    assert torch.all(s.segment_end - s.segment_start + 1 >= m)
    gt = ((s.target_index - s.action_start + 1) / s.action_length).clamp(0, 1)
    torch.testing.assert_close(s.targets, gt.double())
    torch.testing.assert_close(s.lengths, s.target_index - s.segment_start + 1)
    for i in range(0, 4000, 97):
        start, length = int(s.segment_start[i]), int(s.lengths[i])
        torch.testing.assert_close(s.segments[i, :length], emb[start : start + length])
        assert torch.all(s.segments[i, length:] == 0)


def test_sampler_distribution_equals_seed() -> None:
    probs = seed_outcomes(SAMPLER_TIMES, 3)
    n = 200_000
    s = sample_action_segments(torch.zeros(21, 1), SAMPLER_TIMES, k=n, min_segment_len=3, generator=gen(1))
    rows = torch.stack([s.action_start, s.segment_start, s.segment_end, s.target_index], 1).tolist()
    counts = Counter(map(tuple, rows))
    assert set(counts) == set(probs)  # every valid action and every reachable outcome, nothing else
    tv = 0.5 * sum(abs(counts[key] / n - p) for key, p in probs.items())
    assert tv < 0.03


def test_sampler_action_start_mode_and_min_length() -> None:
    emb = torch.randn(21, 2)
    s = sample_action_segments(
        emb, SAMPLER_TIMES, k=500, min_segment_len=3, start="action_start", generator=gen(2)
    )
    assert torch.equal(s.segment_start, s.action_start)
    # min_segment_len=5 leaves only 'c'; 6 leaves nothing
    s5 = sample_action_segments(emb, SAMPLER_TIMES, k=200, min_segment_len=5, generator=gen(3))
    assert set(s5.actions) == {"c"} and torch.all(s5.segment_start == 11) and torch.all(s5.segment_end == 15)
    assert sample_action_segments(emb, SAMPLER_TIMES, k=4, min_segment_len=6, generator=gen(3)) is None
    bg = {"step": ["SIL"], "start_frame": [0], "end_frame": [20], "name": "bg"}
    assert sample_action_segments(emb, bg, k=4, generator=gen(3)) is None


def test_sampler_is_reproducible_from_the_generator() -> None:
    emb = torch.randn(21, 2)
    a = sample_action_segments(emb, SAMPLER_TIMES, k=64, generator=gen(7))
    b = sample_action_segments(emb, SAMPLER_TIMES, k=64, generator=gen(7))
    c = sample_action_segments(emb, SAMPLER_TIMES, k=64, generator=gen(8))
    assert a.actions == b.actions and torch.equal(a.segments, b.segments)
    assert torch.equal(a.target_index, b.target_index) and torch.equal(a.segment_start, b.segment_start)
    assert not torch.equal(a.target_index, c.target_index)


def test_sampler_clamps_to_the_video() -> None:
    times = {"step": ["a"], "start_frame": [0], "end_frame": [29], "name": "long"}  # video has 10 frames
    s = sample_action_segments(torch.randn(10, 2), times, k=300, generator=gen(4))
    assert torch.all(s.target_index <= 9) and torch.all(s.segment_start <= s.target_index)
    torch.testing.assert_close(s.targets, ((s.target_index + 1) / 30).float())


# ---------------------------------------------------------------------------------------- losses
def loss_batch(seed: int) -> tuple[list[torch.Tensor], list[dict]]:
    rng = np.random.default_rng(seed)
    embeddings, times = [], []
    for T in (40, 27, 55):
        times.append(random_times(rng, T, max_len=15))
        embeddings.append(torch.randn(T, 6, dtype=torch.float64, generator=gen(T + seed), requires_grad=True))
    return embeddings, times


LOSS_CASES = [
    {"k": 1},
    {"k": 5, "loss": "l2"},
    {"k": 4, "inverse_weighting": True},
    {"k": 4, "delta_targets": True},
    {"k": 3, "start": "action_start", "min_segment_len": 2},
    {"k": 6, "min_segment_len": 5, "loss": "l2", "inverse_weighting": True},
]


@pytest.mark.parametrize("case", LOSS_CASES)
@pytest.mark.parametrize("variant", LOSS_HEADS)
def test_learnable_loss_matches_loop_reference(case: dict, variant: tuple[str, bool, bool]) -> None:
    head = make_head(*variant, delta=case.get("delta_targets", False))
    embeddings, times = loss_batch(3)
    params = list(head.parameters())
    ours = learnable_progress_loss(head, embeddings, times, generator=gen(11), **case)
    ref = learnable_progress_loss_loop(head, embeddings, times, generator=gen(11), **case)
    assert ours.item() > 0
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    g_ours = torch.autograd.grad(ours, [*embeddings, *params], allow_unused=True, materialize_grads=True)
    g_ref = torch.autograd.grad(ref, [*embeddings, *params], allow_unused=True, materialize_grads=True)
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


class ZeroHead:
    """Predicts 0 everywhere, so the loss exposes its targets, weights and reduction."""

    def __call__(self, segments: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return segments.sum((1, 2)) * 0.0


def test_learnable_loss_targets_weights_and_reduction_by_hand() -> None:
    # long actions fed from their start, so that some targets fall below fix E's 0.05 floor
    times = [
        {"step": ["SIL", "x", "SIL"], "start_frame": [0, 10, 110], "end_frame": [9, 109, 119], "name": "p"},
        {"step": ["y", "z"], "start_frame": [0, 60], "end_frame": [59, 89], "name": "q"},
        {"step": ["0"], "start_frame": [0], "end_frame": [29], "name": "r"},
    ]
    embeddings = [torch.randn(t["end_frame"][-1] + 1, 6, dtype=torch.float64) for t in times]
    g = gen(21)
    samples = [
        sample_action_segments(e, t, k=16, start="action_start", generator=g)
        for e, t in zip(embeddings, times, strict=True)
    ]
    assert samples[2] is None
    kept = [(s.targets[s.lengths >= 2], s.action_length[s.lengths >= 2]) for s in samples[:2]]
    assert all(gt.numel() > 0 for gt, _ in kept) and any(bool((gt < 0.05).any()) for gt, _ in kept)
    plain = sum(float(gt.mean()) for gt, _ in kept)
    weighted = sum(float((gt * (1 / gt.clamp(min=0.05)).clamp(max=20)).mean()) for gt, _ in kept)
    delta = sum(float((1.0 / n.double()).mean()) for _, n in kept)
    run = lambda **kw: learnable_progress_loss(  # noqa: E731
        ZeroHead(), embeddings, times, k=16, start="action_start", generator=gen(21), **kw
    )
    assert run().item() == pytest.approx(plain, rel=1e-12)
    assert run(inverse_weighting=True).item() == pytest.approx(weighted, rel=1e-12)
    assert run(delta_targets=True).item() == pytest.approx(delta, rel=1e-12)


def test_video_without_valid_action_contributes_nothing() -> None:
    head = make_head("gru", True)
    embeddings, times = loss_batch(7)
    empty = {"step": ["SIL", "a"], "start_frame": [0, 10], "end_frame": [9, 11], "name": "e"}  # 'a' too short
    with_empty = learnable_progress_loss(
        head, [*embeddings, torch.randn(12, 6, dtype=torch.float64)], [*times, empty], k=3, generator=gen(2)
    )
    without = learnable_progress_loss(head, embeddings, times, k=3, generator=gen(2))
    torch.testing.assert_close(with_empty, without, rtol=0, atol=0)
    emb = torch.randn(12, 6, dtype=torch.float64, requires_grad=True)
    zero = learnable_progress_loss(head, [emb], [empty], k=3, generator=gen(2))
    assert zero.item() == 0.0
    zero.backward()
    assert torch.all(emb.grad == 0) and all(torch.all(p.grad == 0) for p in head.parameters())


def test_learnable_loss_rejects_mismatched_delta_mode() -> None:
    embeddings, times = loss_batch(1)
    with pytest.raises(ValueError):
        learnable_progress_loss(make_head("gru"), embeddings, times, delta_targets=True)


@pytest.mark.parametrize("seed", range(6))
def test_cumulative_l2_loss_matches_seed_port(seed: int) -> None:
    embeddings, times = loss_batch(seed)
    times[1]["end_frame"][-1] -= 3  # annotation short of the video: the loss stretches the last segment
    ours = cumulative_l2_progress_loss(embeddings, times, generator=gen(seed))
    ref = cumulative_l2_loss_loop(embeddings, times, generator=gen(seed))
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    if ref.requires_grad:
        g_ours = torch.autograd.grad(ours, embeddings, allow_unused=True, materialize_grads=True)
        g_ref = torch.autograd.grad(ref, embeddings, allow_unused=True, materialize_grads=True)
        for a, b in zip(g_ours, g_ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert times[1]["end_frame"][-1] == 23  # the caller's record is untouched


def test_cumulative_l2_loss_skips_single_frame_video() -> None:
    emb = torch.randn(1, 4, requires_grad=True)
    times = {"step": ["a"], "start_frame": [0], "end_frame": [0], "name": "one"}
    loss = cumulative_l2_progress_loss([emb], [times], generator=gen(0))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(emb.grad == 0)


# ---------------------------------------------------------------------------------------- where in the action
def test_relative_position_puts_first_frame_at_0_and_last_at_1() -> None:
    r = relative_position(torch.tensor([3, 1, 5]))
    assert r.tolist() == [0.0, 0.5, 1.0, 1.0, 0.0, 0.25, 0.5, 0.75, 1.0]


def test_window_means_monotonicity_and_bins_by_hand() -> None:
    # action 1 (11 frames): 0.6 at the first two frames (r = 0, 0.1), rising after; action 2 (3 frames):
    # r = 0, 0.5, 1; action 3 (1 frame): only an end
    a1 = [0.6, 0.6, 0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 0.8, 0.9]
    a2 = [0.2, 0.1, 0.7]
    a3 = [0.95]
    values = torch.tensor(a1 + a2 + a3)
    lengths = torch.tensor([11, 3, 1])
    assert window_mean(values, lengths, EARLY) == pytest.approx((0.6 + 0.2) / 2)
    # mid: a1 frame 5 (r = 0.5; 0.45 and 0.55 fall on no frame of a1), a2 frame 1
    assert window_mean(values, lengths, MID) == pytest.approx((0.5 + 0.1) / 2)
    assert window_mean(values, lengths, END) == pytest.approx((0.85 + 0.7 + 0.95) / 3)
    # a1: 9 of 10 steps go up or stay (0.6 -> 0.3 does not); a2: 1 of 2; a3 has no step
    assert monotonicity(values, lengths) == pytest.approx((0.9 + 0.5) / 2)
    means, n_actions = calibration_bins(values, lengths, 10)
    assert n_actions.tolist() == [2, 1, 1, 1, 1, 2, 1, 1, 1, 3]
    assert means[0].item() == pytest.approx((0.6 + 0.2) / 2)
    assert means[5].item() == pytest.approx((0.5 + 0.1) / 2)
    assert means[9].item() == pytest.approx(((0.8 + 0.9) / 2 + 0.7 + 0.95) / 3)
    # a window no action reaches is NaN, not 0
    assert np.isnan(window_mean(torch.tensor([0.1, 0.2]), torch.tensor([1, 1]), EARLY))


@pytest.mark.parametrize("seed", range(4))
def test_position_statistics_match_loop_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 30, size=12)
    values = rng.uniform(size=int(lengths.sum())).round(2)  # rounding makes ties (non-decreasing steps)
    per_action = np.split(values, np.cumsum(lengths)[:-1])
    ref = action_position_stats_loop([a.tolist() for a in per_action])
    v, n = torch.from_numpy(values), torch.from_numpy(lengths)
    for name, window in (("early", EARLY), ("mid", MID), ("end", END)):
        assert window_mean(v, n, window) == pytest.approx(ref[name], rel=1e-12, nan_ok=True)
    assert monotonicity(v, n) == pytest.approx(ref["monotonicity"], rel=1e-12)
    means, n_actions = calibration_bins(v, n, 10)
    assert means.tolist() == pytest.approx(ref["bins"], rel=1e-12, nan_ok=True)
    assert n_actions.tolist() == ref["bin_actions"]


class _Source:
    """The evaluator's view of a task: a model (maybe with a progress head) and fixed embeddings."""

    def __init__(self, head: torch.nn.Module | None, embeddings: dict[str, torch.Tensor]) -> None:
        self.model = torch.nn.Module()
        self.model.progress_head = head
        self.embeddings = embeddings

    def embed_videos(self, videos: list[Video]) -> list[torch.Tensor]:
        return [self.embeddings[v.name] for v in videos]


def _video(name: str, steps: list[tuple[str, int]]) -> Video:
    ends = np.cumsum([n for _, n in steps])
    times = {
        "step": [s for s, _ in steps],
        "start_frame": [0, *ends[:-1].tolist()],
        "end_frame": (ends - 1).tolist(),
        "name": name,
    }
    return Video(name, "t", np.zeros((int(ends[-1]), 2), dtype=np.float32), times)


def _constant_head(value: float) -> ProgressHead:
    """A real GRU head whose output layer ignores its input: sigmoid(bias) = value at every frame."""
    head = ProgressHead(3, 8)
    with torch.no_grad():
        head.fc[-2].weight.zero_()
        head.fc[-2].bias.fill_(float(np.log(value / (1 - value))))
    return head


def _eval_setup(head: torch.nn.Module | None) -> tuple[ProgressEvaluator, list[Video]]:
    train = [_video(f"tr{i}", [("SIL", 2), ("a", 10), ("b", 5), ("SIL", 3)]) for i in range(2)]
    test = [
        _video("te0", [("SIL", 2), ("a", 20), ("b", 3), ("SIL", 1)]),
        _video("te1", [("a", 11), ("SIL", 2)]),
    ]
    # frames move at unit speed along one axis: cumulative distance = frames elapsed
    line = lambda T: torch.arange(T, dtype=torch.float32)[:, None] * torch.tensor([[1.0, 0.0, 0.0]])  # noqa: E731
    embeddings = {v.name: line(v.num_frames) for v in train + test}
    return ProgressEvaluator(_Source(head, embeddings), train), test


def test_evaluator_reports_where_a_constant_head_fails() -> None:
    evaluator, test = _eval_setup(_constant_head(0.6))
    result = evaluator.evaluate(test, curves=10)
    m = result.metrics
    assert set(m) == set(METRIC_NAMES)
    for where in ("early", "mid", "end"):
        assert m[f"progress_{where}"] == pytest.approx(0.6, abs=1e-6)
    assert m["monotonicity"] == 1.0  # a constant never decreases
    # actions of the test split: a (20 frames), b (3), a (11); truth (i + 1) / L, ramp (i + 1) / mean train L
    truths = [np.arange(1, L + 1) / L for L in (20, 3, 11)]
    ramps = [np.minimum(np.arange(1, L + 1) / n, 1.0) for L, n in ((20, 10), (3, 5), (11, 10))]
    ref_truth = action_position_stats_loop([t.tolist() for t in truths])
    ref_ramp = action_position_stats_loop([r.tolist() for r in ramps])
    # early frames (r <= 0.1): a(20) frames 0-1, b(3) frame 0, a(11) frames 0-1 (r = 0, 0.1)
    assert m["progress_early_true"] == pytest.approx((1.5 / 20 + 1 / 3 + 1.5 / 11) / 3)
    for where in ("early", "mid", "end"):
        assert m[f"progress_{where}_true"] == pytest.approx(ref_truth[where])
        assert m[f"progress_{where}_baseline_ramp"] == pytest.approx(ref_ramp[where])
    video_truth = [np.concatenate(truths[:2]), truths[2]]
    assert m["ogpe_action"] == pytest.approx(np.mean([np.abs(t - 0.6).mean() for t in video_truth]), abs=1e-6)
    assert m["ogpe_action_baseline_const"] == pytest.approx(
        np.mean([np.abs(t - 0.5).mean() for t in video_truth])
    )
    cal = result.calibration
    assert cal["predicted"] == pytest.approx([0.6] * 10, abs=1e-6)
    assert cal["true"] == pytest.approx(ref_truth["bins"])
    assert cal["ramp"] == pytest.approx(ref_ramp["bins"])
    assert cal["const"] == [0.5] * 10 and cal["n_actions"] == ref_truth["bin_actions"]
    assert [len(c.truth) for c in result.curves] == [20, 3, 11]
    json.dumps(cal, allow_nan=False)  # plain JSON: empty bins would be None, not NaN


def test_evaluator_scores_video_level_ogpe_against_the_named_ground_truth() -> None:
    evaluator, test = _eval_setup(None)
    # unit-speed frames; the video normaliser is the training videos' mean final distance, 19
    pred = [np.arange(v.num_frames) / 19 for v in test]

    def expected(definition: str) -> float:
        gts = [true_progress_loop(v.times, v.num_frames, definition).numpy() for v in test]
        return float(np.mean([np.abs(g - p).mean() for g, p in zip(gts, pred, strict=True)]))

    assert evaluator.video_gt == "release"
    release = evaluator.evaluate(test).metrics["ogpe"]
    assert release == pytest.approx(expected("release"), abs=1e-6)
    evaluator.video_gt = "completed_frames"
    completed = evaluator.evaluate(test).metrics["ogpe"]
    assert completed == pytest.approx(expected("completed_frames"), abs=1e-6)
    assert abs(release - completed) > 1e-3
    with pytest.raises(ValueError, match="video_gt"):
        ProgressEvaluator(evaluator.source, evaluator.train_videos, video_gt="linear")


def test_evaluator_without_head_scores_the_cumulative_prediction() -> None:
    evaluator, test = _eval_setup(None)
    m = evaluator.evaluate(test).metrics
    # unit-speed frames, training normalisers 9 ('a': 10 frames) and 4 ('b'): prediction i / 9 and i / 4
    preds = [np.arange(20) / 9, np.arange(3) / 4, np.arange(11) / 9]
    ref = action_position_stats_loop([p.tolist() for p in preds])
    assert m["progress_early"] == pytest.approx(ref["early"]) and m["progress_end"] == pytest.approx(
        ref["end"]
    )
    assert m["monotonicity"] == 1.0 and m["ogpe_action"] == m["ogpe_action_cum"]


def test_evaluator_feeds_every_action_online_from_its_start() -> None:
    torch.manual_seed(0)
    head = ProgressHead(3, 8, position_encoding=True, kind="transformer", n_heads=2, ff_dim=16)
    evaluator, test = _eval_setup(head)
    noisy = {
        name: e + torch.randn(e.shape, generator=gen(1)) for name, e in evaluator.source.embeddings.items()
    }
    evaluator.source.embeddings = noisy
    curves = evaluator.evaluate(test, curves=10).curves
    spans = [("te0", 2, 22), ("te0", 22, 25), ("te1", 0, 11)]
    with torch.no_grad():
        for c, (name, a, b) in zip(curves, spans, strict=True):
            assert c.video == name
            np.testing.assert_allclose(
                c.predicted, predict_online_loop(head, noisy[name][a:b]).numpy(), rtol=1e-5
            )


def test_calibration_plot_is_written(tmp_path) -> None:
    evaluator, test = _eval_setup(_constant_head(0.6))
    path = plot_calibration(evaluator.evaluate(test).calibration, tmp_path / "plots" / "calibration.png", "t")
    assert path.is_file() and path.stat().st_size > 10_000
