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

    Slots are L2-normalised and scored by cosine / temperature, `ss[i, j] = <s_t^i, s_{t+1}^j> / tau`.
    The direction of the softmax is the reference's (martius-lab/slotcontrast), which is easy to misread:
    it applies `nn.CrossEntropyLoss` with an identity target to the 3-D tensor `ss` (B*(T-1), S, S), and
    for a 3-D input the class axis is dim 1. So the softmax runs over the slots i at t, once for every
    slot j at t+1: each slot at t+1 must pick itself at t against the other slots at t (not each slot at
    t picking itself at t+1; the two differ whenever `ss` is not symmetric). With `batch_contrast`, the
    slots of all B videos at a step are pooled on the slot axis (S = B*K), so the other videos' slots are
    negatives too. Mean over all (step, slot at t+1) terms."""
    if slots.ndim != 4 or slots.shape[1] < 2:
        raise ValueError(f"slots must be (B, T, K, D) with T >= 2, got {tuple(slots.shape)}")
    z = F.normalize(slots, dim=-1)
    if batch_contrast:
        z = z.transpose(0, 1).flatten(1, 2).unsqueeze(0)  # (1, T, B*K, D), video-major like the reference
    now, nxt = z[:, :-1], z[:, 1:]  # (G, T-1, S, D)
    s = z.shape[2]
    logits = (now @ nxt.transpose(-2, -1) / temperature).reshape(-1, s, s)  # (G*(T-1), S_t, S_t+1)
    target = torch.arange(s, device=slots.device).expand(logits.shape[0], s)  # class (dim 1) of column j: j
    return F.cross_entropy(logits, target)
