"""The two-stream predictor's decoder and its ablations A-E (what the decoder may look at).

Patches (B, N, D) -> a (dim, g, g) map -> log2(patch_size) upsampling levels (ConvTranspose k4 s2 + norm
+ GELU, channels halving from dim) -> conv + sigmoid = predicted img_tk. Optional inputs, per variant:
- skip: a conv stem on img_t to H/4 resolution, concatenated and merged (1x1 conv) where the decoder
  reaches H/4 (56x56 in the 224px model), as in a U-Net;
- CLS injection, FiLM-like and additive (`x + Linear(cls).view(B, C, 1, 1)`) after a level's upsampling.

| variant | patches | img_t skip | CLS injected |
|---|---|---|---|
| A | yes | no | none |
| B | yes | yes | none |
| C | yes | yes | final P-stream CLS at every level |
| D | yes | yes | P-stream CLS per level: final at level 1, earlier stages finer (the new design) |
| E | no | yes | fused CLS: the decoder's only view of the pair beyond img_t (a CLS bottleneck) |

E exists because with M carrying the full RGB difference and the decoder seeing img_t, img_tk is nearly
determined by the patch tokens, so A-D can reconstruct well without a useful CLS (a shortcut).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class DecoderVariant:
    patches: bool  # decode from the fused patch tokens (else from the fused CLS alone)
    skip: bool  # img_t skip connection at H/4
    cls: str  # none | final (P CLS at every level) | stages (P CLS per level) | fused (fused CLS everywhere)


VARIANTS = {
    "A": DecoderVariant(patches=True, skip=False, cls="none"),
    "B": DecoderVariant(patches=True, skip=True, cls="none"),
    "C": DecoderVariant(patches=True, skip=True, cls="final"),
    "D": DecoderVariant(patches=True, skip=True, cls="stages"),
    "E": DecoderVariant(patches=False, skip=True, cls="fused"),
}


def _log2(n: int) -> int | None:
    return n.bit_length() - 1 if n > 0 and n & (n - 1) == 0 else None


def decoder_problems(variant: str, patch_size: int) -> list[str]:
    """What makes this decoder unbuildable, one message per problem (empty: fine)."""
    if variant not in VARIANTS:
        return [f"decoder variant {variant!r}: choose one of {sorted(VARIANTS)}"]
    levels = _log2(patch_size)
    if levels is None or levels < 1:
        return [f"patch_size={patch_size}: the decoder upsamples by 2 per level, needs a power of 2 >= 2"]
    if VARIANTS[variant].skip and levels < 2:
        return [
            f"patch_size={patch_size}: variant {variant}'s img_t skip joins at H/4, needs patch_size >= 4"
        ]
    return []


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm: per-sample statistics, so a prediction never depends on the rest of the batch."""
    return nn.GroupNorm(math.gcd(8, channels), channels)


class VideoDecoder(nn.Module):
    """Decode the encoder's outputs (and img_t, per variant) into the predicted frame img_tk."""

    def __init__(
        self,
        variant: str = "D",
        image_size: int = 224,
        patch_size: int = 16,
        width: int = 768,
        num_stages: int = 3,
        dim: int = 512,
        skip_channels: int = 64,
    ) -> None:
        super().__init__()
        problems = decoder_problems(variant, patch_size)
        if problems:
            raise ValueError("; ".join(problems))
        self.variant, self.spec = variant, VARIANTS[variant]
        self.grid = image_size // patch_size
        self.levels = levels = _log2(patch_size)
        channels = [max(dim >> (i + 1), 8) for i in range(levels)]
        self.input_proj = nn.Sequential(nn.Linear(width, dim), nn.LayerNorm(dim), nn.GELU())
        if not self.spec.patches:  # the CLS is broadcast over the grid; position tells the cells apart
            self.grid_pos = nn.Parameter(torch.zeros(1, dim, self.grid, self.grid))
            nn.init.trunc_normal_(self.grid_pos, std=0.02)
        self.up = nn.ModuleList(
            nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), _norm(c_out), nn.GELU())
            for c_in, c_out in zip([dim, *channels[:-1]], channels, strict=True)
        )
        # the skip joins before level `skip_at`, where the map is at H/4
        self.skip_at = levels - 2
        if self.spec.skip:
            self.stem = nn.Sequential(
                nn.Conv2d(3, skip_channels, 3, stride=2, padding=1),
                nn.GELU(),
                nn.Conv2d(skip_channels, skip_channels, 3, stride=2, padding=1),
                nn.GELU(),
            )
            c = ([dim, *channels])[self.skip_at]
            self.merge = nn.Sequential(nn.Conv2d(c + skip_channels, c, 1), nn.GELU())
        n_inject = {"none": 0, "final": levels, "fused": levels, "stages": min(num_stages, levels)}[
            self.spec.cls
        ]
        self.inject = nn.ModuleList(nn.Linear(width, channels[i]) for i in range(n_inject))
        self.out = nn.Conv2d(channels[-1], 3, 3, padding=1)

    def level_cls(self, enc: dict[str, torch.Tensor | list[torch.Tensor]]) -> list[torch.Tensor]:
        """The CLS injected at each level (level 1 first); shorter than `levels` if late levels get none."""
        if self.spec.cls == "final":
            return [enc["p_cls"]] * self.levels
        if self.spec.cls == "fused":
            return [enc["cls"]] * self.levels
        if self.spec.cls == "stages":  # abstract (final) at the coarsest level, concrete (stage 1) finer
            return list(reversed(enc["p_cls_stages"]))[: len(self.inject)]
        return []

    def forward(self, enc: dict[str, torch.Tensor | list[torch.Tensor]], img_t: torch.Tensor) -> torch.Tensor:
        """enc: the encoder's output dict; img_t: (B, 3, H, W). Returns the predicted img_tk (B, 3, H, W)."""
        b, g = img_t.shape[0], self.grid
        if self.spec.patches:
            x = self.input_proj(enc["patches"]).transpose(1, 2).reshape(b, -1, g, g)  # (B, dim, g, g)
        else:
            x = self.input_proj(enc["cls"])[:, :, None, None] + self.grid_pos  # (B, dim, g, g)
        skip = self.stem(img_t) if self.spec.skip else None  # (B, S, H/4, W/4)
        cls = self.level_cls(enc)
        for i, up in enumerate(self.up):
            if skip is not None and i == self.skip_at:
                x = self.merge(torch.cat([x, skip], 1))
            x = up(x)
            if i < len(cls):
                x = x + self.inject[i](cls[i])[:, :, None, None]
        return torch.sigmoid(self.out(x))
