"""The two-stream video predictor's encoder: M/P preprocessing, the interleaved two-stream ViT, fusion.

A pair (img_t, img_tk) is split into a motion stream M (what changed, 4 channels) and an appearance
stream P (the form of the CURRENT frame, 5 channels). P is computed from img_t alone: computing it from
img_tk, the prediction target, leaked the answer in one version of the original. Each stream is a ViT;
after every stage but the last the two CLS tokens exchange information; the P-stream CLS after each
stage is kept for the decoder's per-level CLS injection (see core/models/video_decoder.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.models.video_decoder import VideoDecoder

# BT.709 luma weights
LUMA = (0.2126, 0.7152, 0.0722)
_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))
_EPS = 1e-6


def luminance(img: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB -> (B, 1, H, W) BT.709 luminance."""
    w = img.new_tensor(LUMA).view(1, 3, 1, 1)
    return (img * w).sum(1, keepdim=True)


def motion_stream(img_t: torch.Tensor, img_tk: torch.Tensor) -> torch.Tensor:
    """M stream `[dL, dR, dG, dB]`: (B, 3, H, W) x 2 in [0, 1] -> (B, 4, H, W), each clamped to [-1, 1]."""
    diff = img_tk - img_t  # (B, 3, H, W)
    return torch.cat([luminance(diff), diff], 1).clamp(-1.0, 1.0)


SOBEL_BORDERS = ("zeros", "replicate")


def sobel(x: torch.Tensor, border: str = "zeros") -> tuple[torch.Tensor, torch.Tensor]:
    """3x3 Sobel gradients (d/dx, d/dy) of (B, 1, H, W) maps; one conv for both.

    `border="zeros"` is the reference's `conv2d(..., padding=1)`: a border pixel sees zeros outside the
    image, so a bright border reads as an edge. `"replicate"` (repeat the border pixels) is the
    alternative this project used before; it is kept as a named option, off by default."""
    if border not in SOBEL_BORDERS:
        raise ValueError(f"border must be one of {SOBEL_BORDERS}, got {border!r}")
    kx = x.new_tensor(_SOBEL_X)
    kernels = torch.stack([kx, kx.T]).unsqueeze(1)  # (2, 1, 3, 3)
    g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="constant" if border == "zeros" else "replicate"), kernels)
    return g[:, :1], g[:, 1:]


def appearance_stream(img_t: torch.Tensor, border: str = "zeros", unbiased_std: bool = True) -> torch.Tensor:
    """P stream `[dx, dy, R, G, B]` of the current frame: (B, 3, H, W) -> (B, 5, H, W).

    dx, dy: Sobel gradients of the per-image z-scored luminance (clamped to +-3), divided by the image's
    largest gradient magnitude (clamped below at 1e-6), so that edges are comparable across exposures.
    As in the reference (bys724/action-agnostic-visual-rl): the z-score uses the unbiased std (torch's
    default) plus 1e-6 and the Sobel pads with zeros. Zero padding usually puts the largest magnitude on
    the border, so it also rescales the interior. `border` and `unbiased_std` name the alternatives."""
    lum = luminance(img_t)
    mean = lum.mean((2, 3), keepdim=True)
    std = lum.std((2, 3), keepdim=True, unbiased=unbiased_std)
    z = ((lum - mean) / (std + _EPS)).clamp(-3.0, 3.0)
    dx, dy = sobel(z, border)
    peak = torch.sqrt(dx.square() + dy.square()).amax((2, 3), keepdim=True).clamp(min=_EPS)  # (B, 1, 1, 1)
    return torch.cat([dx / peak, dy / peak, img_t], 1)


def encoder_problems(
    image_size: int, patch_size: int, width: int, depth: int, heads: int, num_stages: int
) -> list[str]:
    """What makes these encoder sizes unbuildable, one message per problem (empty: fine)."""
    problems = []
    if min(image_size, patch_size, width, depth, heads, num_stages) < 1:
        problems.append("image_size, patch_size, width, depth, heads and num_stages must be >= 1")
    elif image_size % patch_size:
        problems.append(f"image_size={image_size} is not a multiple of patch_size={patch_size}")
    if num_stages >= 1 and depth % num_stages:
        problems.append(f"depth={depth} does not split into num_stages={num_stages} equal stages")
    if heads >= 1 and width % heads:
        problems.append(f"width={width} is not a multiple of heads={heads}")
    return problems


def transformer_layer(width: int, heads: int, mlp_ratio: float) -> nn.TransformerEncoderLayer:
    """One pre-norm transformer layer (GELU, no dropout)."""
    return nn.TransformerEncoderLayer(
        width,
        heads,
        dim_feedforward=int(width * mlp_ratio),
        dropout=0.0,
        activation="gelu",
        batch_first=True,
        norm_first=True,
    )


class StreamEmbedding(nn.Module):
    """Per-stream conv patch embedding, CLS token and learned position embedding."""

    def __init__(self, in_channels: int, image_size: int, patch_size: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)
        n = (image_size // patch_size) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.zeros(1, 1 + n, width))
        nn.init.trunc_normal_(self.cls, std=0.02)
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1 + N, D), CLS first."""
        patches = self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.cls.expand(x.shape[0], -1, -1)
        return torch.cat([cls, patches], 1) + self.pos


class InterleavedTwoStreamViT(nn.Module):
    """Two ViTs (M and P) run stage by stage; the CLS tokens exchange information between stages.

    Returns a dict: `m_tokens`, `p_tokens` (B, 1 + N, D) after the final norms, and `p_cls_stages`, the
    P-stream CLS after each stage (after that stage's exchange; the last one is the final-norm CLS), low
    level first. Stage count, depth, width and heads are free so tests can run tiny models.
    """

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        width: int = 768,
        depth: int = 12,
        heads: int = 12,
        num_stages: int = 3,
        mlp_ratio: float = 4.0,
        exchange_mlp_ratio: float = 1.0,
    ) -> None:
        super().__init__()
        problems = encoder_problems(image_size, patch_size, width, depth, heads, num_stages)
        if problems:
            raise ValueError("; ".join(problems))
        self.image_size, self.patch_size, self.width, self.num_stages = (
            image_size,
            patch_size,
            width,
            num_stages,
        )
        self.m_embed = StreamEmbedding(4, image_size, patch_size, width)
        self.p_embed = StreamEmbedding(5, image_size, patch_size, width)
        per_stage = depth // num_stages

        def stages() -> nn.ModuleList:
            return nn.ModuleList(
                nn.Sequential(*(transformer_layer(width, heads, mlp_ratio) for _ in range(per_stage)))
                for _ in range(num_stages)
            )

        self.m_stages, self.p_stages = stages(), stages()
        # a small block over the two CLS tokens [m_cls, p_cls] after every stage but the last
        self.exchange = nn.ModuleList(
            transformer_layer(width, heads, exchange_mlp_ratio) for _ in range(num_stages - 1)
        )
        self.m_norm, self.p_norm = nn.LayerNorm(width), nn.LayerNorm(width)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def forward(self, m: torch.Tensor, p: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """m: (B, 4, H, W) motion stream, p: (B, 5, H, W) appearance stream."""
        mx, px = self.m_embed(m), self.p_embed(p)  # (B, 1 + N, D) each
        p_cls_stages = []
        for s in range(self.num_stages):
            mx, px = self.m_stages[s](mx), self.p_stages[s](px)
            if s < self.num_stages - 1:
                both = self.exchange[s](torch.stack([mx[:, 0], px[:, 0]], 1))  # (B, 2, D)
                mx = torch.cat([both[:, :1], mx[:, 1:]], 1)
                px = torch.cat([both[:, 1:], px[:, 1:]], 1)
                p_cls_stages.append(px[:, 0])
        mx, px = self.m_norm(mx), self.p_norm(px)
        p_cls_stages.append(px[:, 0])
        return {"m_tokens": mx, "p_tokens": px, "p_cls_stages": p_cls_stages}


class PixelwiseFusion(nn.Module):
    """Fuse the streams per token: `fc_cls(cat(m_cls, p_cls))` and `fc_patch(cat(m_patch, p_patch))`."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc_cls = nn.Linear(2 * width, width)
        self.fc_patch = nn.Linear(2 * width, width)

    def forward(self, m_tokens: torch.Tensor, p_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1 + N, D) x 2 -> fused CLS (B, D) and fused patches (B, N, D)."""
        cls = self.fc_cls(torch.cat([m_tokens[:, 0], p_tokens[:, 0]], -1))
        patches = self.fc_patch(torch.cat([m_tokens[:, 1:], p_tokens[:, 1:]], -1))
        return cls, patches


class TwoStreamEncoder(nn.Module):
    """Pair -> behaviour representation: preprocessing, the interleaved ViT and the fusion.

    Output dict: `cls` (B, D) fused CLS (the representation), `patches` (B, N, D) fused patch tokens,
    `p_cls` (B, D) final P-stream CLS, `p_cls_stages` (list of (B, D), low level first)."""

    def __init__(self, sobel_border: str = "zeros", **vit_kwargs: float | int) -> None:
        super().__init__()
        if sobel_border not in SOBEL_BORDERS:
            raise ValueError(f"sobel_border must be one of {SOBEL_BORDERS}, got {sobel_border!r}")
        self.sobel_border = sobel_border
        self.vit = InterleavedTwoStreamViT(**vit_kwargs)
        self.fusion = PixelwiseFusion(self.vit.width)

    def forward(
        self, img_t: torch.Tensor, img_tk: torch.Tensor
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """img_t, img_tk: (B, 3, H, W) in [0, 1]."""
        out = self.vit(motion_stream(img_t, img_tk), appearance_stream(img_t, self.sobel_border))
        cls, patches = self.fusion(out["m_tokens"], out["p_tokens"])
        return {
            "cls": cls,
            "patches": patches,
            "p_cls": out["p_tokens"][:, 0],
            "p_cls_stages": out["p_cls_stages"],
        }


class TwoStreamVideoPredictor(nn.Module):
    """Encoder + decoder: predicts img_tk from (img_t, img_tk); the encoder's fused CLS is the product."""

    def __init__(self, encoder: TwoStreamEncoder, decoder: VideoDecoder) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(
        self, img_t: torch.Tensor, img_tk: torch.Tensor
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """The encoder's outputs plus `pred` (B, 3, H, W), the predicted img_tk."""
        enc = self.encoder(img_t, img_tk)
        return {**enc, "pred": self.decoder(enc, img_t)}


def build_two_stream(
    image_size: int,
    patch_size: int,
    width: int,
    depth: int,
    heads: int,
    num_stages: int,
    mlp_ratio: float = 4.0,
    exchange_mlp_ratio: float = 1.0,
    decoder: dict | None = None,
    sobel_border: str = "zeros",
) -> TwoStreamVideoPredictor:
    """The predictor from the `model` config group's values (decoder: variant, dim, skip_channels;
    sobel_border: the P stream's Sobel padding, "zeros" as in the reference)."""
    vit = dict(image_size=image_size, patch_size=patch_size, width=width, num_stages=num_stages)
    encoder = TwoStreamEncoder(
        sobel_border,
        **vit,
        depth=depth,
        heads=heads,
        mlp_ratio=mlp_ratio,
        exchange_mlp_ratio=exchange_mlp_ratio,
    )
    return TwoStreamVideoPredictor(encoder, VideoDecoder(**vit, **(decoder or {})))
