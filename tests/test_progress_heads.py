"""The four progress heads (GRU, mean, ALiBi transformer, dilated conv) against per-segment loops."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from core.models.progress_head import HEAD_KINDS, ProgressHead, alibi_slopes, gather_segments
from core.train.progress import build_model
from launchers.config import ConfigError, compose_experiment
from tests.reference.progress import alibi_slopes_paper, head_forward_loop, predict_online_loop

D = 6
# (kind, position_encoding A, learnable start B): every kind with every combination of A and B
HEAD_VARIANTS = list(itertools.product(HEAD_KINDS, (False, True), (False, True)))
LENGTHS = (1, 7, 3, 12, 2, 20)


def make_head(kind: str, pos: bool = False, start: bool = False, delta: bool = False) -> ProgressHead:
    """A tiny float64 head; the conv has 3 layers (receptive field 15) so that 20-frame segments exceed
    it, and fix B's state is non-zero so that using it (or not) shows."""
    torch.manual_seed(0)
    head = ProgressHead(
        D,
        8,
        position_encoding=pos,
        learnable_h0=start,
        delta_output=delta,
        kind=kind,
        n_layers=3 if kind == "dilated_conv" else 2,
        n_heads=2,
        ff_dim=16,
    ).double()
    with torch.no_grad():
        for p in (head.h0, head.start_token):
            if p is not None:
                p.normal_()
    return head


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def variant_id(v: tuple) -> str:
    kind, pos, start = v
    return kind + ("+A" if pos else "") + ("+B" if start else "")


def test_alibi_slopes_follow_the_paper() -> None:
    assert alibi_slopes(8).tolist() == [2.0**-i for i in range(1, 9)]
    assert alibi_slopes(4).tolist() == [0.25, 0.0625, 0.015625, 0.00390625]
    # not a power of two: the 4 slopes of n=4, then the odd-indexed slopes of n=8 (1/2, 1/8)
    assert alibi_slopes(6).tolist() == [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]
    for n in range(1, 17):
        assert alibi_slopes(n).tolist() == pytest.approx(alibi_slopes_paper(n), rel=1e-15)


@pytest.mark.parametrize("variant", HEAD_VARIANTS, ids=variant_id)
def test_batched_forward_equals_per_segment_loop(variant: tuple[str, bool, bool]) -> None:
    head = make_head(*variant)
    segs = [torch.randn(n, D, dtype=torch.float64, generator=gen(n), requires_grad=True) for n in LENGTHS]
    padded = torch.nn.utils.rnn.pad_sequence(segs, batch_first=True)
    batched = head(padded, torch.tensor([s.shape[0] for s in segs]))
    ref = torch.stack([head_forward_loop(head, s) for s in segs])
    torch.testing.assert_close(batched, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(head(segs), ref, rtol=1e-10, atol=1e-12)
    assert torch.all((batched > 0) & (batched < 1))
    weights = torch.randn(len(segs), dtype=torch.float64, generator=gen(99))
    params = list(head.parameters())
    g_batched = torch.autograd.grad((batched * weights).sum(), [*segs, *params])
    g_ref = torch.autograd.grad((ref * weights).sum(), [*segs, *params])
    for a, b in zip(g_batched, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("variant", HEAD_VARIANTS, ids=variant_id)
def test_gradients_reach_every_parameter_and_only_valid_frames(variant: tuple[str, bool, bool]) -> None:
    head = make_head(*variant)
    x = torch.randn(3, 9, D, dtype=torch.float64, generator=gen(1), requires_grad=True)
    head(x, torch.tensor([9, 4, 2])).sum().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert torch.all(x.grad[1, 4:] == 0) and torch.all(x.grad[2, 2:] == 0)
    assert x.grad[1, :4].abs().sum() > 0 and x.grad[2, :2].abs().sum() > 0


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_heads_are_causal(kind: str) -> None:
    """Changing frames after t changes nothing at t: the per-frame pass of the full action gives
    every prefix's answer (fix A is off: its feature depends on the prefix length by design)."""
    head = make_head(kind, start=True)
    action = torch.randn(20, D, dtype=torch.float64, generator=gen(3))
    later = action.clone()
    later[11:] = torch.randn(9, D, dtype=torch.float64, generator=gen(4))
    with torch.no_grad():
        a, b = head.predict_online(action), head.predict_online(later)
    torch.testing.assert_close(a[:11], b[:11], rtol=0, atol=0)
    assert (a[11:] - b[11:]).abs().min() > 0


@pytest.mark.parametrize("variant", HEAD_VARIANTS, ids=variant_id)
@pytest.mark.parametrize("delta", [False, True])
def test_predict_online_equals_prefix_by_prefix_loop(variant: tuple[str, bool, bool], delta: bool) -> None:
    head = make_head(*variant, delta=delta)
    actions = [torch.randn(n, D, dtype=torch.float64, generator=gen(10 + n)) for n in (17, 1, 5, 9)]
    with torch.no_grad():
        expected = [predict_online_loop(head, a) for a in actions]
        torch.testing.assert_close(head.predict_online(actions[0]), expected[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(
            head.predict_online_actions(actions), torch.cat(expected), rtol=1e-10, atol=1e-12
        )
        # a tiny budget forces one item (action or prefix) per chunk; the answer must not change
        torch.testing.assert_close(
            head.predict_online_actions(actions, max_chunk_frames=1),
            torch.cat(expected),
            rtol=1e-10,
            atol=1e-12,
        )
    if delta:
        assert all(bool((torch.diff(e) >= 0).all()) for e in expected)  # accumulated increments only grow


def test_predict_online_single_pass_matches_prefix_batch_exactly_when_causal() -> None:
    """Without fix A the fast path (one pass per action) and a forward over every prefix agree."""
    for kind in HEAD_KINDS:
        head = make_head(kind, start=True)
        action = torch.randn(14, D, dtype=torch.float64, generator=gen(5))
        prefixes = action.unsqueeze(0).expand(14, 14, D)
        with torch.no_grad():
            torch.testing.assert_close(
                head.predict_online(action), head(prefixes, torch.arange(1, 15)), rtol=1e-12, atol=1e-13
            )


@pytest.mark.parametrize("kind", ["transformer", "dilated_conv"])
def test_new_heads_have_about_a_tenth_of_a_million_parameters(kind: str) -> None:
    n = sum(p.numel() for p in ProgressHead(128, 64, kind=kind).parameters())
    assert 80_000 <= n <= 130_000, n


def test_old_use_gru_switch_still_selects_the_seed_heads() -> None:
    assert ProgressHead(4, use_gru=True).kind == "gru" and ProgressHead(4, use_gru=False).kind == "mean"
    assert ProgressHead(4, use_gru=False, kind="transformer").kind == "transformer"
    assert ProgressHead(4, use_gru=False, learnable_h0=True).start_token is not None  # fix B on the mean head


@pytest.mark.parametrize(
    "kwargs",
    [{"kind": "lstm"}, {"kind": "transformer", "n_heads": 3}, {"kind": "dilated_conv", "n_layers": 0}],
)
def test_bad_head_options_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ProgressHead(4, 8, **kwargs)


def test_bad_lengths_raise() -> None:
    head = make_head("transformer")
    x = torch.randn(2, 5, D, dtype=torch.float64)
    for lengths in ([0, 5], [6, 5], [5]):
        with pytest.raises(ValueError):
            head(x, torch.tensor(lengths))
    with pytest.raises(ValueError):
        head.predict_online_actions([])


def test_gather_segments_cuts_and_zero_pads() -> None:
    frames = torch.arange(20, dtype=torch.float64).reshape(10, 2)
    out = gather_segments(frames, np.array([0, 7, 3]), np.array([2, 3, 1]))
    assert out.shape == (3, 3, 2)
    assert out[0].tolist() == [[0, 1], [2, 3], [0, 0]]
    assert out[1].tolist() == [[14, 15], [16, 17], [18, 19]]
    assert out[2].tolist() == [[6, 7], [0, 0], [0, 0]]


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_head_type_config_builds_that_head(kind: str) -> None:
    cfg = compose_experiment(
        "progress_head_study", [f"loss.progress.head.type={kind}", "loss.progress.fixes.learnable_h0=true"]
    )
    head = build_model(cfg, cfg.data.generator.d_in, 2).progress_head
    assert head.kind == kind and (head.h0 is not None) == (kind == "gru")
    assert (head.start_token is not None) == (kind != "gru")


@pytest.mark.parametrize(
    "override",
    ["loss.progress.head.type=lstm", "loss.progress.head.type=transformer loss.progress.head.heads=3"],
)
def test_bad_head_config_is_rejected_naming_the_key(override: str) -> None:
    with pytest.raises(ConfigError, match=r"loss\.progress\.head\.(type|hidden_dim)"):
        compose_experiment("progress_head_study", override.split())


def test_run_configs_saved_before_head_type_still_build() -> None:
    cfg = compose_experiment("progress_learnable")
    OmegaConf.set_struct(cfg, False)
    del cfg.loss.progress.head["type"]
    cfg.loss.progress.head.use_gru = False  # the seeds' switch: mean-pool head
    assert build_model(cfg, cfg.data.generator.d_in, 2).progress_head.kind == "mean"
