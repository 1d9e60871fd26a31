"""The two-stream predictor: preprocessing, shapes, P independent of the target, what each decoder sees."""

import pytest
import torch
import torch.nn.functional as F

from core.metrics.representation import per_pair_mse
from core.models.two_stream import (
    TwoStreamEncoder,
    appearance_stream,
    build_two_stream,
    motion_stream,
)
from core.models.video_decoder import VARIANTS, VideoDecoder
from tests.reference.representation import appearance_stream_loop, motion_stream_loop

TINY = dict(image_size=32, patch_size=8, width=32, depth=3, heads=4, num_stages=3)


def tiny(variant: str = "D", **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_two_stream(**{**TINY, **overrides}, decoder=dict(variant=variant, dim=32, skip_channels=8))


def pair(b: int = 2, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g), torch.rand(b, 3, size, size, generator=g)


@pytest.mark.parametrize(("border", "unbiased_std"), [("zeros", True), ("replicate", False)])
def test_streams_match_loop_references(border, unbiased_std):
    img_t, img_tk = (x.double() for x in pair(b=2, size=9))
    img_t[1, :, 3:6, 3:6] = 1.0  # a saturated patch: the +-3 clamp is active, so the std matters
    p, m = appearance_stream(img_t, border, unbiased_std), motion_stream(img_t, img_tk)
    assert p.shape == (2, 5, 9, 9) and m.shape == (2, 4, 9, 9)
    for b in range(2):
        ref = appearance_stream_loop(img_t[b], border, unbiased_std)
        torch.testing.assert_close(p[b], ref, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(m[b], motion_stream_loop(img_t[b], img_tk[b]), rtol=1e-12, atol=1e-12)
    assert p[:, :2].abs().amax((1, 2, 3)).max() <= 1.0  # gradients scaled by the largest magnitude


def test_appearance_defaults_are_the_references_zero_padding_and_unbiased_std():
    p = appearance_stream(pair(b=1, size=9)[0].double())
    torch.testing.assert_close(p, appearance_stream_loop(p[0, 2:])[None], rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match="border"):
        appearance_stream(p[:, 2:], border="reflect")


def test_appearance_sobel_pads_with_zeros_on_a_4x4_edge():
    # luminance 0 | 1 in two column halves; z = -a | a. With zero padding the border columns see the
    # zeros outside (dx = -3a on the corner rows, -4a inside) and the top/bottom rows see a vertical
    # step (dy); the largest magnitude is 8a (interior), so everything is divided by 8a.
    img = torch.zeros(1, 3, 4, 4, dtype=torch.float64)
    img[..., 2:] = 1.0
    edge = torch.tensor([-3.0, 6.0, 6.0, -3.0]) / 8
    inner = torch.tensor([-0.5, 1.0, 1.0, -0.5])
    dx = torch.stack([edge, inner, inner, edge]).double()
    top = torch.tensor([-3.0, -2.0, 2.0, 3.0]) / 8
    dy = torch.stack([top, torch.zeros(4), torch.zeros(4), -top]).double()
    p = appearance_stream(img)
    torch.testing.assert_close(p[0, 0], dx, rtol=0, atol=1e-12)
    torch.testing.assert_close(p[0, 1], dy, rtol=0, atol=1e-12)
    torch.testing.assert_close(p[0, 2:], img[0])
    # replicated borders (the named alternative) see no edge but the real one
    p = appearance_stream(img, border="replicate")
    torch.testing.assert_close(p[0, 0], torch.tensor([0.0, 1.0, 1.0, 0.0]).double().expand(4, 4))
    assert p[0, 1].abs().max() == 0


def test_appearance_z_score_uses_the_unbiased_std_under_the_clamp():
    # one bright pixel at (1, 1) of a dark 4x4 image: mean 1/16, unbiased std exactly 1/4, so the dark
    # pixels score d = -1/4 and the bright one 15/4, clamped to 3. Largest magnitude: |dx(1, 2)| =
    # 6 - 2d; dx(1, 0) = 6 + 2d (zero padding), so dx(1, 0) = 5.5 / 6.5 = 11/13. The biased std
    # (sqrt(15)/16) gives d = -0.2582 and 0.8415 instead.
    img = torch.zeros(1, 3, 4, 4, dtype=torch.float64)
    img[..., 1, 1] = 1.0
    p = appearance_stream(img)
    assert float(p[0, 0, 1, 0]) == pytest.approx(11 / 13, abs=1e-5)
    assert float(p[0, 0, 1, 2]) == pytest.approx(-1.0, abs=1e-12)
    d = -(1 / 16) / (15**0.5 / 16)
    biased = appearance_stream(img, unbiased_std=False)
    assert float(biased[0, 0, 1, 0]) == pytest.approx((6 + 2 * d) / (6 - 2 * d), abs=1e-5)
    assert abs(float(biased[0, 0, 1, 0]) - 11 / 13) > 4e-3


def test_the_encoder_uses_the_configured_sobel_border():
    img_t, img_tk = pair(b=1)
    seen = {}
    for border in ("zeros", "replicate"):
        model = tiny(sobel_border=border)
        model.encoder.vit.register_forward_hook(lambda m, args, out, b=border: seen.update({b: args[1]}))
        model(img_t, img_tk)
    torch.testing.assert_close(seen["zeros"], appearance_stream(img_t))
    torch.testing.assert_close(seen["replicate"], appearance_stream(img_t, border="replicate"))
    with pytest.raises(ValueError, match="sobel_border"):
        tiny(sobel_border="reflect")


def test_appearance_gradients_point_along_an_edge():
    img = torch.zeros(1, 3, 8, 8)
    img[..., 4:] = 1.0  # dark left half, bright right half: a vertical edge
    p = appearance_stream(img)
    inside = p[0, :, 1:-1, 1:-1]  # away from the zero-padded border
    assert inside[0, :, 2:4].min() > 0.4 and inside[0, :, :1].abs().max() == 0  # dx only at the edge
    assert inside[1].abs().max() < 1e-6  # no vertical change
    torch.testing.assert_close(p[0, 2:], img[0])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_predicts_a_frame(variant):
    model = tiny(variant)
    img_t, img_tk = pair(b=3)
    out = model(img_t, img_tk)
    assert out["pred"].shape == (3, 3, 32, 32)
    assert out["pred"].min() >= 0 and out["pred"].max() <= 1
    assert out["cls"].shape == (3, 32) and out["p_cls"].shape == (3, 32)
    assert out["patches"].shape == (3, 16, 32)
    assert len(out["p_cls_stages"]) == 3 and all(c.shape == (3, 32) for c in out["p_cls_stages"])
    torch.testing.assert_close(out["p_cls_stages"][-1], out["p_cls"])
    out["pred"].mean().backward()


def test_224px_model_has_the_original_layout():
    enc = TwoStreamEncoder(image_size=224, patch_size=16, width=48, depth=12, heads=12, num_stages=3)
    assert enc.vit.grid == 14 and len(enc.vit.m_stages) == 3 and len(enc.vit.m_stages[0]) == 4
    assert len(enc.vit.exchange) == 2
    dec = VideoDecoder("D", image_size=224, patch_size=16, width=48, num_stages=3, dim=512)
    assert dec.levels == 4 and [up[0].out_channels for up in dec.up] == [256, 128, 64, 32]
    assert dec.skip_at == 2  # after 14->28->56: the skip joins at 56x56
    assert len(dec.inject) == 3  # final, stage 2, stage 1 at levels 1-3; nothing at level 4


def _capture(module: torch.nn.Module, store: dict, key: str, output: bool = False) -> None:
    def hook(_mod, inputs, out):
        store[key] = out if output else inputs[0]

    module.register_forward_hook(hook)


def test_p_stream_does_not_depend_on_the_target_frame():
    """The defect of one original version: P computed from img_tk leaks the answer."""
    model = tiny()
    img_t, img_tk = pair()
    img_t.requires_grad_(True)
    img_tk.requires_grad_(True)
    seen: dict[str, torch.Tensor] = {}
    _capture(model.encoder.vit.p_embed, seen, "p_in")
    _capture(model.encoder.vit.m_embed, seen, "m_in")
    _capture(model.encoder.vit.p_stages[0], seen, "p_stage1", output=True)  # before the first exchange
    model(img_t, img_tk)
    torch.testing.assert_close(seen["p_in"], appearance_stream(img_t))
    for key in ("p_in", "p_stage1"):
        g_tk, g_t = torch.autograd.grad(
            seen[key].square().sum(), (img_tk, img_t), allow_unused=True, retain_graph=True
        )
        assert g_tk is None or not g_tk.any(), key
        assert g_t is not None and g_t.abs().sum() > 0, key
    (g_m,) = torch.autograd.grad(seen["m_in"].square().sum(), img_tk)
    assert g_m.abs().sum() > 0  # the M stream does see the target: the check can fail


def _decoder_inputs(model, b: int = 2) -> tuple[dict, torch.Tensor]:
    """Independent leaf tensors for every encoder output, so gradients tell which ones a decoder reads."""
    img_t, img_tk = pair(b)
    with torch.no_grad():
        enc = model.encoder(img_t, img_tk)
    leaves = {
        "cls": enc["cls"].clone().requires_grad_(True),
        "patches": enc["patches"].clone().requires_grad_(True),
        "p_cls": enc["p_cls"].clone().requires_grad_(True),
        "p_cls_stages": [c.clone().requires_grad_(True) for c in enc["p_cls_stages"]],
    }
    return leaves, img_t.clone().requires_grad_(True)


# variant -> (patches, img_t, fused cls, final P cls, the stage P CLS)
SEES = {
    "A": (True, False, False, False, [False, False, False]),
    "B": (True, True, False, False, [False, False, False]),
    "C": (True, True, False, True, [False, False, False]),
    "D": (True, True, False, False, [True, True, True]),
    "E": (False, True, True, False, [False, False, False]),
}


@pytest.mark.parametrize("variant", sorted(SEES))
def test_decoder_variant_sees_exactly_its_inputs(variant):
    model = tiny(variant)
    enc, img_t = _decoder_inputs(model)
    pred = model.decoder(enc, img_t)
    inputs = [enc["patches"], img_t, enc["cls"], enc["p_cls"], *enc["p_cls_stages"]]
    grads = torch.autograd.grad(pred.square().sum(), inputs, allow_unused=True)
    used = [g is not None and bool(g.abs().sum() > 0) for g in grads]
    patches, image, cls, p_cls, stages = SEES[variant]
    assert used == [patches, image, cls, p_cls, *stages]


def test_variant_d_injects_the_final_cls_first_and_earlier_stages_finer():
    model = tiny("D")
    enc, _ = _decoder_inputs(model)
    s1, s2, final = enc["p_cls_stages"]
    levels = model.decoder.level_cls(enc)
    assert [id(c) for c in levels] == [id(final), id(s2), id(s1)]


def test_variant_e_prediction_ignores_the_patch_tokens():
    model = tiny("E")
    enc, img_t = _decoder_inputs(model)
    before = model.decoder(enc, img_t)
    enc["patches"] = torch.randn_like(enc["patches"]) * 10
    torch.testing.assert_close(model.decoder(enc, img_t), before)


def test_prediction_of_one_pair_does_not_depend_on_the_batch():
    model = tiny("D")
    img_t, img_tk = pair(b=4)
    full = model(img_t, img_tk)["pred"]
    torch.testing.assert_close(model(img_t[:1], img_tk[:1])["pred"], full[:1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["A", "D", "E"])
def test_loss_decreases_on_a_fixed_tiny_batch(variant):
    model = tiny(variant)
    g = torch.Generator().manual_seed(3)
    img_t = F.interpolate(torch.rand(8, 3, 8, 8, generator=g), size=32, mode="bilinear")  # smooth images
    img_tk = torch.roll(img_t, shifts=2, dims=3)  # a learnable relation: shift right by 2 pixels
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = per_pair_mse(model(img_t, img_tk)["pred"], img_tk).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses[::20]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(depth=4), "depth=4"),
        (dict(patch_size=6, image_size=36), "patch_size=6"),
        (dict(image_size=30), "image_size=30"),
        (dict(width=30), "width=30"),
    ],
)
def test_bad_sizes_raise_naming_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny("D", **kwargs)


def test_unknown_variant_and_skip_without_room_raise():
    with pytest.raises(ValueError, match="'F'"):
        VideoDecoder("F", image_size=32, patch_size=8, width=32)
    with pytest.raises(ValueError, match="patch_size >= 4"):
        VideoDecoder("B", image_size=32, patch_size=2, width=32)
    VideoDecoder("A", image_size=32, patch_size=2, width=32)  # no skip: 2 px patches are fine
