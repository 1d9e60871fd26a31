"""TCC: temporal cycle-consistency, cycle-back regression with variance (Dwibedi et al., CVPR 2019).

For an ordered pair (U, V): `alpha = softmax(-cdist(U, V) / tau)` (Euclidean, not squared), soft nearest
neighbours `S = alpha @ V`, `beta = softmax(-cdist(S, U) / tau)`, `mu_i = sum_l beta_il l`,
`var_i = sum_l beta_il (l - mu_i)^2 + VAR_EPS`; per-frame loss
`(i - mu_i)^2 / var_i + lambda * log(sqrt(var_i))`.
As in the GTCC release: every ordered pair INCLUDING the self-pair, each pair summed over its frames, the
total divided by B^2. All pairs run as one batched pass over zero-padded videos; masked softmaxes give the
padded frames exactly zero weight and zero contribution.

Fixed release defects (shared/reference/gtcc.md): the variance is per row, `(l - mu_i)`, not `(l - mu_l)`;
`VAR_EPS` keeps a one-hot `beta` (well-separated embeddings) finite instead of NaN. The softmax is
max-shifted (torch's softmax), so large distances never underflow to 0/0.

`masked_softmax` is shared with the GTCC loss.
"""

from __future__ import annotations

import torch

from core.losses.pairs import ordered_pairs, pad_sequences

VAR_EPS = 1e-6  # frames^2; a cycle-back distribution this sharp is already a certain match


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max-shifted softmax over the last axis restricted to `mask` (broadcastable to `logits`).

    Masked entries get exactly zero weight and zero gradient. A row without any valid entry comes out
    uniform (finite, so no NaN reaches the backward pass); callers must zero such rows' contribution.
    """
    logits = logits.masked_fill(~mask, float("-inf"))
    logits = logits.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    return torch.softmax(logits, dim=-1)


def tcc_loss(
    sequences: list[torch.Tensor], *, softmax_temp: float = 0.1, alignment_variance: float = 0.001
) -> torch.Tensor:
    """TCC loss of one batch of (T_i, D) embeddings (scalar): sum over all ordered pairs / B^2."""
    x, mask, _ = pad_sequences(sequences)  # (B, T, D), (B, T)
    x = x.to(torch.promote_types(x.dtype, torch.float32))  # AMP may hand us half
    batch, frames = mask.shape
    first, second = ordered_pairs(batch, include_self=True, device=x.device)
    u, v = x[first], x[second]  # (P, T, D) each
    mask_u, mask_v = mask[first], mask[second]  # (P, T) each
    alpha = masked_softmax(
        -torch.cdist(u, v) / softmax_temp, mask_u[:, :, None] & mask_v[:, None, :]
    )  # (P, T_u, T_v)
    snn = alpha @ v  # (P, T_u, D)
    beta = masked_softmax(
        -torch.cdist(snn, u) / softmax_temp, mask_u[:, :, None] & mask_u[:, None, :]
    )  # (P, T_u, T_u)
    idx = torch.arange(frames, dtype=x.dtype, device=x.device)  # (T,)
    mean = beta @ idx  # (P, T_u)
    var = (beta * (idx - mean[..., None]) ** 2).sum(-1) + VAR_EPS  # (P, T_u)
    per_frame = (idx - mean) ** 2 / var + alignment_variance * 0.5 * torch.log(var)  # (P, T_u)
    return torch.where(mask_u, per_frame, 0.0).sum() / batch**2
