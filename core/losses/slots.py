"""Losses of the slot model: feature reconstruction and SlotContrast's slot-slot contrastive loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def feature_reconstruction_loss(reconstruction: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """MSE between the decoder's reconstruction and the backbone features (B, T, N, D).

    The target is detached: with a fine-tuned backbone the loss must not pull the features towards what
    the slots can reconstruct (a collapse to constant features would make the loss trivially zero)."""
    return F.mse_loss(reconstruction, features.detach())


def slot_contrastive_loss(
    slots: torch.Tensor, temperature: float = 0.1, batch_contrast: bool = True
) -> torch.Tensor:
    """SlotContrast's temporal slot-slot loss; slots (B, T, K, D) with T >= 2.

    Slots are L2-normalised. For every step t -> t+1, each slot i at t scores every slot j at t+1 by
    cosine / temperature, and cross-entropy makes it pick j = i (itself one frame later) against the
    other slots. With `batch_contrast`, the slots of all B videos at a step are pooled on the slot axis
    (B*K candidates), so the other videos' slots are negatives too. Mean over all (step, slot) terms."""
    if slots.ndim != 4 or slots.shape[1] < 2:
        raise ValueError(f"slots must be (B, T, K, D) with T >= 2, got {tuple(slots.shape)}")
    z = F.normalize(slots, dim=-1)
    if batch_contrast:
        z = z.transpose(0, 1).flatten(1, 2).unsqueeze(0)  # (1, T, B*K, D)
    now, nxt = z[:, :-1], z[:, 1:]  # (G, T-1, S, D)
    logits = torch.einsum("gtid,gtjd->gtij", now, nxt) / temperature  # (G, T-1, S, S)
    s = logits.shape[-1]
    target = torch.arange(s, device=slots.device).expand(*logits.shape[:-1])
    return F.cross_entropy(logits.reshape(-1, s), target.reshape(-1))
