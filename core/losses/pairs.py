"""Batching helpers shared by the alignment losses: pad variable-length videos, enumerate pairs."""

from __future__ import annotations

import torch


def pad_sequences(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack variable-length (T_i, D) sequences so pairwise math runs as one batched op.

    Returns `x` (B, T_max, D) zero-padded, `mask` (B, T_max) True on real frames, `lengths` (B,).
    """
    lengths = torch.tensor([s.shape[0] for s in sequences], device=sequences[0].device)
    x = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True)  # (B, T_max, D)
    mask = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]  # (B, T_max)
    return x, mask, lengths


def ordered_pairs(
    batch_size: int, *, include_self: bool, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (i, j) of every ordered pair of videos in a batch, row-major, optionally with i == j."""
    i, j = torch.meshgrid(
        torch.arange(batch_size, device=device), torch.arange(batch_size, device=device), indexing="ij"
    )
    i, j = i.reshape(-1), j.reshape(-1)
    if not include_self:
        keep = i != j
        i, j = i[keep], j[keep]
    return i, j
