"""The object-centric slot model: frozen ViT -> feature MLP -> slot attention over time -> MLP decoder.

`SlotModel.forward` returns a dict of named outputs (SlotContrast style), so losses and metrics address what
they consume by key: `features` (the reconstruction target), `slots`, `grouper_masks`, `decoder_masks`,
`reconstruction`. Masks are per frame at patch resolution; `upsample_masks` brings them to an image size
(`core.metrics.segmentation.masks_to_labels(patch_grid(masks), size)` gives hard label maps).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from core.models.backbone import ViTBackbone

INITIALIZERS = ("fixed", "sampled")


class FeatureTransform(nn.Module):
    """LayerNorm -> Linear -> ReLU -> Linear: backbone features to the grouper's input size."""

    def __init__(self, input_dim: int, output_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(input_dim),
            nn.Linear(input_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, output_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., N, D_feat) -> (..., N, D_out)."""
        return self.net(x)


class SlotInitializer(nn.Module):
    """Initial slots of the first frame.

    `fixed`: one learned vector per slot (SlotContrast), the same for every video, so slot k keeps a role.
    `sampled`: slots drawn from a learned Gaussian (STEVE), exchangeable; noise comes from `generator`.
    """

    def __init__(self, num_slots: int, slot_dim: int, mode: str = "fixed") -> None:
        super().__init__()
        if mode not in INITIALIZERS:
            raise ValueError(f"slot initializer must be one of {INITIALIZERS}, got {mode!r}")
        self.num_slots, self.slot_dim, self.mode = num_slots, slot_dim, mode
        if mode == "fixed":
            self.slots = nn.Parameter(torch.randn(1, num_slots, slot_dim) * slot_dim**-0.5)
        else:
            self.mu = nn.Parameter(torch.randn(1, 1, slot_dim) * slot_dim**-0.5)
            self.log_sigma = nn.Parameter(torch.full((1, 1, slot_dim), -0.5 * math.log(slot_dim)))

    def forward(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """-> (B, K, D)."""
        if self.mode == "fixed":
            return self.slots.expand(batch_size, -1, -1)
        noise = torch.randn((batch_size, self.num_slots, self.slot_dim), generator=generator)
        return self.mu + self.log_sigma.exp() * noise.to(self.mu.device)


class SlotAttention(nn.Module):
    """Slot attention (Locatello et al.): slots compete for inputs (softmax over slots), then each slot
    takes the weighted mean of its inputs' values and is updated by a GRU and a residual MLP."""

    def __init__(
        self,
        input_dim: int,
        slot_dim: int,
        iterations: int = 3,
        hidden_dim: int | None = None,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        if iterations < 1:
            raise ValueError(f"slot attention needs >= 1 iteration, got {iterations}")
        self.iterations, self.eps, self.scale = iterations, eps, slot_dim**-0.5
        self.norm_inputs = nn.LayerNorm(input_dim)
        self.to_k = nn.Linear(input_dim, slot_dim, bias=False)
        self.to_v = nn.Linear(input_dim, slot_dim, bias=False)
        self.norm_slots = nn.LayerNorm(slot_dim)
        self.to_q = nn.Linear(slot_dim, slot_dim, bias=False)
        self.gru = nn.GRUCell(slot_dim, slot_dim)
        hidden_dim = hidden_dim or 4 * slot_dim
        self.norm_mlp = nn.LayerNorm(slot_dim)
        self.mlp = nn.Sequential(nn.Linear(slot_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, slot_dim))

    def forward(self, inputs: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs (B, N, D_in), slots (B, K, D) -> slots (B, K, D), last iteration's masks (B, K, N)."""
        x = self.norm_inputs(inputs)
        k, v = self.to_k(x), self.to_v(x)  # (B, N, D)
        b, n_slots, d = slots.shape
        for _ in range(self.iterations):
            q = self.to_q(self.norm_slots(slots))  # (B, K, D)
            masks = torch.einsum("bkd,bnd->bkn", q, k).mul(self.scale).softmax(dim=1)  # over slots
            weights = masks + self.eps
            weights = weights / weights.sum(dim=-1, keepdim=True)  # weighted mean over inputs
            updates = torch.einsum("bkn,bnd->bkd", weights, v)
            slots = self.gru(updates.reshape(-1, d), slots.reshape(-1, d)).reshape(b, n_slots, d)
            slots = slots + self.mlp(self.norm_mlp(slots))
        return slots, masks


class TemporalPredictor(nn.Module):
    """Pre-norm transformer over the slots of a frame: the initial slots of the next frame."""

    def __init__(self, slot_dim: int, depth: int = 1, num_heads: int = 4) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            slot_dim, num_heads, 4 * slot_dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.net = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        return self.net(slots)  # (B, K, D)


class MLPDecoder(nn.Module):
    """Spatial broadcast decoder: every slot plus a learned position embedding, through an MLP, gives a
    feature vector and an alpha logit per patch; alpha softmax over slots gives the masks, and the
    reconstruction is the mask-weighted sum of the slots' features."""

    def __init__(self, slot_dim: int, output_dim: int, num_patches: int, hidden_dims: Sequence[int]) -> None:
        super().__init__()
        self.pos_emb = nn.Parameter(torch.randn(1, 1, num_patches, slot_dim) * slot_dim**-0.5)
        layers: list[nn.Module] = []
        dims = [slot_dim, *hidden_dims]
        for a, b in itertools.pairwise(dims):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], output_dim + 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """slots (B, K, D) -> reconstruction (B, N, D_out), masks (B, K, N)."""
        out = self.mlp(slots.unsqueeze(2) + self.pos_emb)  # (B, K, N, D_out + 1)
        masks = out[..., -1].softmax(dim=1)  # (B, K, N)
        recon = torch.einsum("bkn,bknd->bnd", masks, out[..., :-1])
        return recon, masks


class SlotModel(nn.Module):
    """Backbone, feature transform, slot initializer, grouper, temporal predictor and decoder in one module
    (one state dict; the submodule names are what `param_groups` patterns match)."""

    def __init__(
        self,
        backbone: ViTBackbone,
        feature_transform: FeatureTransform,
        initializer: SlotInitializer,
        grouper: SlotAttention,
        predictor: TemporalPredictor,
        decoder: MLPDecoder,
        freeze_backbone: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_transform = feature_transform
        self.initializer = initializer
        self.grouper = grouper
        self.predictor = predictor
        self.decoder = decoder
        self.freeze_backbone = freeze_backbone
        self.backbone.requires_grad_(not freeze_backbone)

    @property
    def num_slots(self) -> int:
        return self.initializer.num_slots

    def forward(
        self, video: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """video (B, T, 3, S, S) in [0, 1], S the backbone's img_size -> named outputs:
        features / reconstruction (B, T, N, D_feat), slots (B, T, K, D), grouper_masks / decoder_masks
        (B, T, K, N)."""
        b, t = video.shape[:2]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            features = self.backbone(video.flatten(0, 1))  # (B*T, N, D_feat)
        features = features.unflatten(0, (b, t))
        inputs = self.feature_transform(features)  # (B, T, N, D_in)
        slots = self.initializer(b, generator)
        all_slots, all_masks = [], []
        # frames depend on each other through the predictor: this recurrence is inherently sequential
        for i in range(t):
            slots, masks = self.grouper(inputs[:, i], slots)
            all_slots.append(slots)
            all_masks.append(masks)
            if i + 1 < t:
                slots = self.predictor(slots)
        slots = torch.stack(all_slots, dim=1)  # (B, T, K, D)
        recon, dec_masks = self.decoder(slots.flatten(0, 1))
        return {
            "features": features,
            "slots": slots,
            "grouper_masks": torch.stack(all_masks, dim=1),
            "decoder_masks": dec_masks.unflatten(0, (b, t)),
            "reconstruction": recon.unflatten(0, (b, t)),
        }


def patch_grid(masks: torch.Tensor) -> torch.Tensor:
    """Patch masks (..., N) on a square grid (row-major, as the backbone's patches) -> (..., g, g)."""
    n = masks.shape[-1]
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"masks have {n} patches, not a square grid")
    return masks.unflatten(-1, (g, g))


def upsample_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Patch masks (B, T, K, N) -> (B, T, K, H, W), bilinear, so each pixel's masks still sum to 1."""
    grid = patch_grid(masks)  # (B, T, K, g, g)
    img = F.interpolate(grid.flatten(0, 1), size=size, mode="bilinear", align_corners=False)
    return img.unflatten(0, masks.shape[:2])
