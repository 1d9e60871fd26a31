"""The learnable progress head of the seed plan, with the head-side fixes A, B and D.

A segment of embeddings (from a start frame to a target frame) goes in, progress at its last frame
comes out. Batches of segments of different lengths are handled in one call (packed GRU or masked
mean) so that the loss never loops over samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_sequence


class ProgressHead(nn.Module):
    """GRU (or mean-pool MLP) -> sigmoid progress in [0, 1] at each segment's last frame.

    `position_encoding` (fix A) appends t / T_seg to frame t of a segment of T_seg frames so that the
    head knows how much it has seen; `learnable_h0` (fix B, GRU only) learns the initial hidden state;
    `delta_output` (fix D) means the output is the per-frame progress increment, which
    `predict_online` accumulates.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int = 64,
        use_gru: bool = True,
        position_encoding: bool = False,
        learnable_h0: bool = False,
        delta_output: bool = False,
    ) -> None:
        super().__init__()
        if learnable_h0 and not use_gru:
            raise ValueError("learnable_h0 (fix B) needs the GRU head")
        self.use_gru = use_gru
        self.position_encoding = position_encoding
        self.learnable_h0 = learnable_h0
        self.delta_output = delta_output
        in_dim = input_dim + int(position_encoding)
        if use_gru:
            self.gru = nn.GRU(in_dim, hidden_dim, num_layers=1, batch_first=True)
            self.fc = nn.Sequential(nn.Linear(hidden_dim, 32), nn.ReLU(), nn.Linear(32, 1), nn.Sigmoid())
        else:
            self.fc = nn.Sequential(
                nn.Linear(in_dim, hidden_dim),
                nn.ReLU(),
                nn.Linear(hidden_dim, 32),
                nn.ReLU(),
                nn.Linear(32, 1),
                nn.Sigmoid(),
            )
        self.register_parameter("h0", nn.Parameter(torch.zeros(1, 1, hidden_dim)) if learnable_h0 else None)

    def forward(
        self, segments: Tensor | Sequence[Tensor], lengths: Tensor | Sequence[int] | None = None
    ) -> Tensor:
        """Progress at the last valid frame of each segment: (B, L_max, D) + lengths (B,) -> (B,).

        A list of (T_i, D) tensors is padded here; a tensor without `lengths` is taken as unpadded.
        """
        if not isinstance(segments, Tensor):
            seqs = list(segments)
            lengths = torch.tensor([s.shape[0] for s in seqs])
            segments = pad_sequence(seqs, batch_first=True)
        B, L_max, _ = segments.shape
        if lengths is None:
            lengths = torch.full((B,), L_max)
        lengths = torch.as_tensor(lengths, dtype=torch.long).cpu()  # pack_padded_sequence wants CPU lengths
        if lengths.shape != (B,) or bool((lengths < 1).any()) or bool((lengths > L_max).any()):
            raise ValueError("lengths must hold one value in [1, L_max] per segment")
        lengths_dev = lengths.to(segments.device)
        steps = torch.arange(L_max, device=segments.device)
        valid = steps < lengths_dev[:, None]  # (B, L_max)
        x = segments
        if self.position_encoding:
            pos = steps.to(x.dtype)[None] / lengths_dev.to(x.dtype)[:, None]  # from each segment's own length
            x = torch.cat([x, torch.where(valid, pos, 0.0)[..., None]], dim=-1)  # (B, L_max, D+1)
        if self.use_gru:
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            h0 = self.h0.expand(1, B, -1).contiguous() if self.h0 is not None else None
            _, h_n = self.gru(packed, h0)  # (1, B, H), back in input order
            features = h_n[0]
        else:
            features = torch.where(valid[..., None], x, 0.0).sum(1) / lengths_dev[:, None].to(x.dtype)
        return self.fc(features).squeeze(-1)  # (B,)

    def predict_online(self, action_embeddings: Tensor, max_chunk_frames: int = 1 << 16) -> Tensor:
        """Progress at every frame of an action fed from its start, using frames <= t only: (L, D) -> (L,).

        All L prefixes go through `forward` as padded batches (so fix A sees each prefix's own length);
        a chunk holds at most about `max_chunk_frames` padded frames to bound memory. In delta mode the
        per-prefix increments are summed and clipped to [0, 1].
        """
        L, D = action_embeddings.shape
        chunks: list[Tensor] = []
        first = 0
        while first < L:
            # n prefixes starting at length first+1 pad to first+n frames: n * (first + n) <= budget
            n = max(1, int((math.sqrt(first * first + 4 * max_chunk_frames) - first) // 2))
            last = min(L, first + n)
            prefixes = action_embeddings[:last].unsqueeze(0).expand(last - first, last, D)  # (n, last, D)
            chunks.append(self(prefixes, torch.arange(first + 1, last + 1)))
            first = last
        out = torch.cat(chunks) if chunks else action_embeddings.new_zeros(0)  # (L,)
        return out.cumsum(0).clamp(0.0, 1.0) if self.delta_output else out
