"""The GTCC-family video encoder: a temporal-stacking conv base and the multi-head (MCN) model.

Both take a padded batch of per-frame features so a whole batch of variable-length videos is one
forward pass; padded frames are re-zeroed after every conv so each video's output equals what a
forward of that video alone would give.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn


def _mlp(sizes: list[int], act: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


class TemporalStacking(nn.Module):
    """Bias-free Conv1d stack: in -> hidden (k=2), hidden -> out (k), then (n_layers - 2) x out -> out (k).

    Defaults are the release's: 2048 -> 256 (k=2) -> 128 (k=3) -> five 128 -> 128 (k=3), ReLU between.
    """

    def __init__(
        self,
        input_dim: int = 2048,
        hidden_dim: int = 256,
        output_dim: int = 128,
        n_layers: int = 7,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        if n_layers < 2:
            raise ValueError(f"TemporalStacking needs n_layers >= 2, got {n_layers}")
        dims = [(input_dim, hidden_dim, 2), (hidden_dim, output_dim, kernel_size)]
        dims += [(output_dim, output_dim, kernel_size)] * (n_layers - 2)
        self.convs = nn.ModuleList(nn.Conv1d(a, b, k, bias=False) for a, b, k in dims)
        # 'same' padding done by hand (left (k-1)//2, rest right, as torch does) to avoid its copy
        self.pads = [((k - 1) // 2, k - 1 - (k - 1) // 2) for _, _, k in dims]
        self.output_dim = output_dim

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, D_in), mask (B, T) -> (B, T, output_dim), zero on padded frames."""
        m = mask[:, None, :].to(x.dtype)  # (B, 1, T)
        h = x.transpose(1, 2) * m  # (B, D_in, T)
        for i, (conv, pad) in enumerate(zip(self.convs, self.pads, strict=True)):
            h = conv(nn.functional.pad(h, pad))
            if i < len(self.convs) - 1:
                h = torch.relu(h)
            h = h * m
        return h.transpose(1, 2)  # (B, T, D)


class MultiHeadModel(nn.Module):
    """MCN: H per-task heads on the base embedding, mixed per frame by a softmax attention over heads.

    Fixes of the release: heads are concatenated per frame (the release's `.view(T, -1)` mixed
    frames) and kept in a fixed order (the release built them from a set). With `drop_context`, the
    GTCC drop-context net gives each video a (D+1,) vector: weights and bias of a per-frame drop score.
    """

    def __init__(
        self,
        base: TemporalStacking,
        num_heads: int,
        *,
        head_layers: tuple[int, ...] = (512, 128, 256),
        attn_layers: tuple[int, ...] = (512, 1024, 512, 512),
        drop_layers: tuple[int, ...] = (256, 1024, 512, 256),
        drop_context: bool = False,
    ) -> None:
        super().__init__()
        d = base.output_dim
        self.base = base
        self.num_heads = num_heads
        self.heads = nn.ModuleList(_mlp([d, *head_layers, d], nn.ReLU) for _ in range(num_heads))
        self.attention = _mlp([num_heads * d, *attn_layers, num_heads], nn.Tanh) if num_heads > 1 else None
        self.drop_net = _mlp([d, *drop_layers, d + 1], nn.ReLU) if drop_context else None
        self.output_dim = d

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, T, D_in), mask (B, T) -> dict with `embeddings` (B, T, D), `attention` (B, T, H) and,
        with drop context, `dropouts` (B, D+1)."""
        base = self.base(x, mask)  # (B, T, D)
        heads = torch.stack([head(base) for head in self.heads], dim=2)  # (B, T, H, D)
        if self.attention is None:
            attn = torch.ones(heads.shape[:3], dtype=x.dtype, device=x.device)  # (B, T, 1)
        else:
            attn = torch.softmax(self.attention(heads.flatten(2)), dim=-1)  # (B, T, H)
        m = mask[..., None].to(x.dtype)
        out = {"embeddings": (attn[..., None] * heads).sum(2) * m, "attention": attn}
        if self.drop_net is not None:
            per_frame = self.drop_net(out["embeddings"]) * m  # (B, T, D+1)
            out["dropouts"] = per_frame.sum(1) / m.sum(1).clamp_min(1.0)  # (B, D+1) mean over real frames
        return out
