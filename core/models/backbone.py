"""The ViT backbone of the slots family: patch tokens of the last block, before the final norm.

The parameter names are those of timm's `VisionTransformer` and of DINO / DINOv2 (`patch_embed.proj`,
`cls_token`, `pos_embed`, `blocks.<i>.{norm1,attn.qkv,attn.proj,ls1,norm2,mlp.fc1,mlp.fc2,ls2}`), so a
released state dict (e.g. the teacher of the DINO 'say' ViT-B/14) loads without renaming. timm itself is
not used: it imports torchvision at import time, and no torchvision build matches the pinned CPU torch.
Weights are never downloaded: `load_vit_checkpoint` reads a local file.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# checkpoint entries the backbone does not need: features are taken before the final norm, without a head
IGNORED_PREFIXES = ("norm.", "fc_norm.", "head.", "mask_token")


class LayerScale(nn.Module):
    """DINOv2's per-channel residual scale (`ls1.gamma`)."""

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d_head)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (LayerNorm eps 1e-6 as in timm and DINO)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, layer_scale: float | None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class ViTBackbone(nn.Module):
    """A plain ViT with a CLS token; `forward` returns only the patch tokens of the last block.

    Args:
        img_size: square input side in pixels; a multiple of `patch_size`.
        patch_size: 14 for the DINO 'say' and DINOv2 models.
        embed_dim, depth, num_heads: 768/12/12 for ViT-B, 384/12/6 for ViT-S.
        layer_scale: initial LayerScale value (DINOv2 checkpoints have `ls1.gamma`), or None (DINO, timm).
    """

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        layer_scale: float | None = None,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size, self.patch_size, self.embed_dim = img_size, patch_size, embed_dim
        self.grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + self.grid**2, embed_dim) * 0.02)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, layer_scale) for _ in range(depth))
        # not in the state dict: a released checkpoint has no such entries
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def num_patches(self) -> int:
        return self.grid**2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, img_size, img_size) in [0, 1] -> patch tokens (B, N, D), row-major patch order."""
        x = self.patch_embed((images - self.mean) / self.std)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x[:, 1:]  # drop CLS: the reconstruction target is patch tokens only


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + g*g, D) -> (1, 1 + grid*grid, D): bicubic resize of the patch positions (CLS kept)."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    old = math.isqrt(patches.shape[1])
    if old * old != patches.shape[1]:
        raise ValueError(f"pos_embed has {patches.shape[1]} patch positions, not a square grid")
    if old == grid:
        return pos_embed
    img = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, img.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos_embed.dtype)], dim=1)


def _backbone_entries(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DDP's `module.` and keep the `backbone.` part of a DINO student/teacher dict (not its head)."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    return state


def load_vit_checkpoint(model: ViTBackbone, path: str | Path) -> None:
    """Load a local ViT state dict (a DINO checkpoint's `teacher`, or a plain timm/DINO state dict).

    Strict: a missing or unexpected entry raises ValueError naming the file and the entries. The final
    norm and any head are skipped (the features are taken before them). pos_embed is resized to the
    model's grid when the checkpoint was trained at another resolution."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model.backbone.checkpoint={str(path)!r}: no such file")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors of every kind: the file is not a plain tensor dict
        raise ValueError(
            f"model.backbone.checkpoint={str(path)!r}: cannot be read as a tensor state dict with "
            f"weights_only=True ({type(exc).__name__}: {exc}); if it is a full DINO training checkpoint "
            "of a trusted source, save its 'teacher' entry alone and point to that file"
        ) from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(raw).__name__}")
    state = raw.get("teacher", raw.get("state_dict", raw.get("model", raw)))
    state = _backbone_entries(state)
    ignored = sorted(k for k in state if k.startswith(IGNORED_PREFIXES))
    state = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}
    if "pos_embed" in state:
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], model.grid)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    )
    if missing or unexpected or shapes:
        raise ValueError(
            f"model.backbone.checkpoint={str(path)!r} does not match the configured ViT "
            f"(model.backbone.*): missing {missing}; unexpected {unexpected}; shape mismatches {shapes}"
        )
    model.load_state_dict(state)
    log.info("loaded backbone weights from %s (%d tensors; skipped %s)", path, len(state), ignored)
