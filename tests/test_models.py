"""The encoder: a padded batch gives each video what it would get alone; MCN mixing is per frame."""

import torch

from core.losses.pairs import pad_sequences
from core.models.encoder import MultiHeadModel, TemporalStacking


def _model(drop: bool = True, heads: int = 3) -> MultiHeadModel:
    torch.manual_seed(0)
    base = TemporalStacking(input_dim=12, hidden_dim=16, output_dim=8, n_layers=4)
    return MultiHeadModel(
        base, heads, head_layers=(16,), attn_layers=(16, 16), drop_layers=(16,), drop_context=drop
    )


def test_padded_batch_equals_each_video_alone():
    model = _model().double()
    videos = [torch.randn(n, 12, dtype=torch.float64) for n in (9, 4, 13)]
    x, mask, _ = pad_sequences(videos)
    out = model(x, mask)
    for i, v in enumerate(videos):
        alone = model(v[None], torch.ones(1, len(v), dtype=torch.bool))
        torch.testing.assert_close(out["embeddings"][i, : len(v)], alone["embeddings"][0])
        torch.testing.assert_close(out["dropouts"][i], alone["dropouts"][0])
    assert torch.all(out["embeddings"][1, 4:] == 0)


def test_base_matches_release_layer_layout():
    base = TemporalStacking()  # 2048 -> 256 (k=2) -> 128 (k=3) -> five 128 -> 128 (k=3), no bias
    shapes = [tuple(c.weight.shape) for c in base.convs]
    assert shapes == [(256, 2048, 2), (128, 256, 3)] + [(128, 128, 3)] * 5
    assert all(c.bias is None for c in base.convs)


def test_attention_is_a_per_frame_softmax_over_heads_in_fixed_order():
    model = _model().double()
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    mask = torch.ones(2, 7, dtype=torch.bool)
    out = model(x, mask)
    assert out["attention"].shape == (2, 7, 3)
    torch.testing.assert_close(out["attention"].sum(-1), torch.ones(2, 7, dtype=torch.float64))
    # the output is the attention-weighted sum of the heads evaluated on the same frame
    base = model.base(x, mask)
    heads = torch.stack([h(base) for h in model.heads], dim=2)
    torch.testing.assert_close(out["embeddings"], (out["attention"][..., None] * heads).sum(2))
    # frame t's attention depends only on frame t's head outputs: changing frame 5 leaves frame 0 alone
    # whenever the conv receptive field does not reach it
    x2 = x.clone()
    x2[:, 6] += 1.0
    assert torch.allclose(model(x2, mask)["attention"][:, 0], out["attention"][:, 0])


def test_drop_context_only_when_asked():
    assert "dropouts" not in _model(drop=False)(torch.randn(1, 5, 12), torch.ones(1, 5, dtype=torch.bool))
    out = _model(drop=True)(torch.randn(1, 5, 12), torch.ones(1, 5, dtype=torch.bool))
    assert out["dropouts"].shape == (1, 9)  # D + 1
