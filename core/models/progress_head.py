"""The learnable progress heads of the seed plans, with the head-side fixes A, B and D.

A segment of embeddings (from a start frame to a target frame) goes in, progress at its last frame
comes out. Four sequence models are available (`kind`): the seeds' GRU and mean-pool MLP, and the
heads the same researchers planned next, a causal transformer with ALiBi position bias and a causal
dilated-convolution stack. All four are causal - the feature at frame t depends on frames <= t only -
so one pass over a padded batch gives every segment's output at its last valid frame, and one pass
over a whole action gives the online prediction at every frame at once (unless fix A is on, whose
position feature depends on the prefix's own length).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pad_sequence

HEAD_KINDS = ("gru", "mean", "transformer", "dilated_conv")


def gather_segments(frames: Tensor, first: np.ndarray, lengths: np.ndarray) -> Tensor:
    """Zero-padded (N, L_max, D) windows frames[first_i : first_i + lengths_i] with one index op.

    frames (F, D); first and lengths (N,) int arrays with lengths >= 1."""
    offsets = np.arange(int(lengths.max()))
    inside = offsets < lengths[:, None]  # (N, L_max)
    index = np.where(inside, first[:, None] + offsets, first[:, None])
    index_t = torch.from_numpy(index.reshape(-1)).to(frames.device)
    inside_t = torch.from_numpy(inside[..., None]).to(frames.device, frames.dtype)
    # index_select (backward: index_add) is the cheapest gather on CPU; padding rows are finite
    return frames.index_select(0, index_t).view(*index.shape, -1) * inside_t  # (N, L_max, D)


def alibi_slopes(n_heads: int) -> Tensor:
    """Per-head ALiBi slopes (Press et al. 2022): the geometric sequence 2^(-8/n), 2^(-16/n), ... for n a
    power of two; otherwise the slopes of the largest power of two below n, topped up with every other
    slope of twice that power."""
    if n_heads < 1:
        raise ValueError(f"n_heads must be >= 1, got {n_heads}")
    below = 2 ** math.floor(math.log2(n_heads))
    slopes = [2.0 ** (-8.0 * (i + 1) / below) for i in range(below)]
    if below < n_heads:
        slopes += [2.0 ** (-8.0 * (i + 1) / (2 * below)) for i in range(0, 2 * below, 2)][: n_heads - below]
    return torch.tensor(slopes, dtype=torch.float64)


class _CausalAlibiBlock(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)) with ALiBi bias and a causal mask, then x + FF(LN(x))."""

    def __init__(self, dim: int, n_heads: int, ff_dim: int) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"transformer width {dim} is not divisible by {n_heads} heads")
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_dim), nn.GELU(), nn.Linear(ff_dim, dim))

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        """x (B, L, C), bias (B, heads, L, L) additive (-inf where masked) -> (B, L, C)."""
        B, L, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.n_heads, C // self.n_heads).unbind(2)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias
        )  # (B, heads, L, C / heads)
        x = x + self.out(att.transpose(1, 2).reshape(B, L, C))
        return x + self.ff(self.norm2(x))


class _AlibiTransformer(nn.Module):
    """Causal transformer over frames; position enters only through the ALiBi bias -m_h (i - j)."""

    def __init__(self, in_dim: int, dim: int, n_layers: int, n_heads: int, ff_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)
        self.blocks = nn.ModuleList(_CausalAlibiBlock(dim, n_heads, ff_dim) for _ in range(n_layers))
        self.norm = nn.LayerNorm(dim)
        self.register_buffer("slopes", alibi_slopes(n_heads), persistent=False)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        """x (B, L, in), valid (B, L) -> (B, L, dim)."""
        L = x.shape[1]
        steps = torch.arange(L, device=x.device)
        distance = (steps[:, None] - steps[None, :]).to(x.dtype)  # (L, L) query i - key j
        # causal, and padded keys masked too (with right padding causality alone already hides them
        # from valid queries; the mask keeps padded queries finite: key 0 is always valid)
        allowed = (distance >= 0)[None] & valid[:, None, :]  # (B, L, L)
        bias = -self.slopes.to(x.dtype)[:, None, None] * distance  # (heads, L, L)
        bias = torch.where(allowed[:, None], bias[None], float("-inf"))  # (B, heads, L, L)
        h = self.proj(x)
        for block in self.blocks:
            h = block(h, bias)
        return self.norm(h)


class _DilatedCausalConv(nn.Module):
    """Input projection, then residual blocks h + ReLU(conv_d(h)) with kernel k and dilations 1, 2, 4, ...,
    each left-padded by (k - 1) d so that frame t sees frames <= t only.

    Receptive field: 1 + (k - 1)(2^n - 1) frames (255 for the default k = 3, n = 7)."""

    def __init__(self, in_dim: int, dim: int, n_layers: int, kernel_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)
        self.dilations = [2**i for i in range(n_layers)]
        self.kernel_size = kernel_size
        self.convs = nn.ModuleList(nn.Conv1d(dim, dim, kernel_size, dilation=d) for d in self.dilations)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, L, in) -> (B, L, dim); right padding never reaches earlier frames."""
        h = self.proj(x).transpose(1, 2)  # (B, dim, L)
        for conv, d in zip(self.convs, self.dilations, strict=True):
            h = h + torch.relu(conv(F.pad(h, ((self.kernel_size - 1) * d, 0))))
        return h.transpose(1, 2)


class ProgressHead(nn.Module):
    """Causal sequence model -> sigmoid progress in [0, 1] at each segment's last frame.

    `kind` picks the sequence model: 'gru' (the seeds'), 'mean' (the seeds' mean-pool MLP; the
    cumulative mean is causal too), 'transformer' (causal self-attention with ALiBi bias) or
    'dilated_conv' (causal dilated 1-D convolutions). `use_gru` is the seeds' older switch between the
    first two and is only read when `kind` is not given.

    Fixes: `position_encoding` (A) appends t / T_seg to frame t of a segment of T_seg frames so that the
    head knows how much it has seen. `learnable_h0` (B) learns the initial state: the GRU's h0; the
    other heads have no recurrent state, so their counterpart is a learned start token prepended to
    every segment (in input space, after fix A's feature): what the head sees before any frame is then
    learned rather than nothing, which is what h0 gives the GRU, and a 1-frame segment is no longer a
    lone, context-free input. `delta_output` (D) makes the output the per-frame progress increment,
    which `predict_online` accumulates.

    `hidden_dim` is the GRU state, the mean head's MLP width, and the transformer / conv width. With
    the defaults and 128-d embeddings the transformer has ~0.11M parameters, the conv ~0.1M, the GRU 40k.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int = 64,
        use_gru: bool = True,
        position_encoding: bool = False,
        learnable_h0: bool = False,
        delta_output: bool = False,
        *,
        kind: str | None = None,
        n_layers: int | None = None,
        n_heads: int = 4,
        ff_dim: int | None = None,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        kind = kind if kind is not None else ("gru" if use_gru else "mean")
        if kind not in HEAD_KINDS:
            raise ValueError(f"progress head kind must be one of {list(HEAD_KINDS)}, got {kind!r}")
        if n_layers is not None and n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        self.kind = kind
        self.position_encoding = position_encoding
        self.learnable_h0 = learnable_h0
        self.delta_output = delta_output
        in_dim = input_dim + int(position_encoding)
        out_mlp = [nn.Linear(hidden_dim, 32), nn.ReLU(), nn.Linear(32, 1), nn.Sigmoid()]
        if kind == "gru":
            self.gru = nn.GRU(in_dim, hidden_dim, num_layers=1, batch_first=True)
        elif kind == "transformer":
            self.transformer = _AlibiTransformer(
                in_dim, hidden_dim, n_layers or 2, n_heads, ff_dim or 4 * hidden_dim
            )
        elif kind == "dilated_conv":
            self.conv = _DilatedCausalConv(in_dim, hidden_dim, n_layers or 7, kernel_size)
        else:  # mean: the MLP starts from the pooled input
            out_mlp = [nn.Linear(in_dim, hidden_dim), nn.ReLU(), *out_mlp]
        self.fc = nn.Sequential(*out_mlp)
        self.register_parameter(
            "h0", nn.Parameter(torch.zeros(1, 1, hidden_dim)) if learnable_h0 and kind == "gru" else None
        )
        self.register_parameter(
            "start_token", nn.Parameter(torch.zeros(in_dim)) if learnable_h0 and kind != "gru" else None
        )

    @property
    def use_gru(self) -> bool:
        return self.kind == "gru"

    @property
    def _quadratic(self) -> float:
        """Attention scores per frame and per frame of length (heads / width), for chunk sizing."""
        if self.kind != "transformer":
            return 0.0
        block = self.transformer.blocks[0]
        return block.n_heads / block.qkv.in_features

    # ------------------------------------------------------------------ internals
    def _with_position(self, x: Tensor, lengths: Tensor, valid: Tensor) -> Tensor:
        """Fix A: append t / T_seg (T_seg: the segment's own length) to frame t: (B, L, D) -> (B, L, D+1)."""
        if not self.position_encoding:
            return x
        steps = torch.arange(x.shape[1], device=x.device, dtype=x.dtype)
        pos = steps[None] / lengths.to(x.dtype)[:, None]  # (B, L)
        return torch.cat([x, torch.where(valid, pos, 0.0)[..., None]], dim=-1)

    def _frame_features(self, x: Tensor, valid: Tensor) -> Tensor:
        """Causal per-frame features of right-padded inputs: (B, L, in) -> (B, L, F), F = what `fc` takes.

        Frame t's feature depends on frames <= t only (and on the learned start, fix B)."""
        if self.start_token is not None:
            B = x.shape[0]
            x = torch.cat([self.start_token.to(x.dtype).expand(B, 1, -1), x], dim=1)  # (B, 1 + L, in)
            valid = torch.cat([valid.new_ones(B, 1), valid], dim=1)
        if self.kind == "gru":
            h0 = self.h0.expand(1, x.shape[0], -1).contiguous() if self.h0 is not None else None
            # unpacked: padding sits after each segment's last frame, so it cannot reach it, and on the
            # CPU the plain GRU beats pack_padded_sequence even with the wasted steps
            feats, _ = self.gru(x, h0)
        elif self.kind == "transformer":
            feats = self.transformer(x, valid)
        elif self.kind == "dilated_conv":
            feats = self.conv(x)
        else:
            summed = torch.where(valid[..., None], x, 0.0).cumsum(1)
            feats = summed / valid.cumsum(1).clamp(min=1).to(x.dtype)[..., None]
        return feats[:, 1:] if self.start_token is not None else feats

    def _lengths(
        self, lengths: Tensor | Sequence[int] | None, B: int, L_max: int, device: torch.device
    ) -> Tensor:
        lengths = torch.full((B,), L_max) if lengths is None else torch.as_tensor(lengths, dtype=torch.long)
        if lengths.shape != (B,) or bool((lengths < 1).any()) or bool((lengths > L_max).any()):
            raise ValueError("lengths must hold one value in [1, L_max] per segment")
        return lengths.to(device)

    # ------------------------------------------------------------------ API
    def forward(
        self, segments: Tensor | Sequence[Tensor], lengths: Tensor | Sequence[int] | None = None
    ) -> Tensor:
        """Progress at the last valid frame of each segment: (B, L_max, D) + lengths (B,) -> (B,).

        A list of (T_i, D) tensors is padded here; a tensor without `lengths` is taken as unpadded.
        """
        if not isinstance(segments, Tensor):
            seqs = list(segments)
            lengths = [s.shape[0] for s in seqs]
            segments = pad_sequence(seqs, batch_first=True)
        B, L_max, _ = segments.shape
        lengths_t = self._lengths(lengths, B, L_max, segments.device)
        valid = torch.arange(L_max, device=segments.device)[None] < lengths_t[:, None]  # (B, L_max)
        feats = self._frame_features(self._with_position(segments, lengths_t, valid), valid)
        last = feats[torch.arange(B, device=feats.device), lengths_t - 1]  # (B, F)
        return self.fc(last).squeeze(-1)  # (B,)

    def predict_online(self, action_embeddings: Tensor, max_chunk_frames: int = 1 << 16) -> Tensor:
        """Progress at every frame of one action fed from its start, from frames <= t only: (L, D) -> (L,)."""
        return self.predict_online_actions([action_embeddings], max_chunk_frames)

    def predict_online_actions(self, actions: Sequence[Tensor], max_chunk_frames: int = 1 << 16) -> Tensor:
        """`predict_online` of many actions at once: list of (L_i, D) -> (sum L_i,), concatenated in order.

        Without fix A the heads are causal, so a padded batch of whole actions gives every prefix's
        output in one pass. Fix A's feature t / T_prefix changes with the prefix, so then every prefix
        is a segment of its own (sum L_i of them, as the loop over t would feed them), sorted by
        length and batched. Either way a chunk holds at most about `max_chunk_frames` padded frames.
        In delta mode each action's per-prefix increments are summed and clipped to [0, 1].
        """
        lengths = np.array([a.shape[0] for a in actions], dtype=np.int64)
        if lengths.size == 0 or not (lengths >= 1).all():
            raise ValueError("predict_online needs at least one action, each with at least one frame")
        param = next(self.parameters())
        frames = torch.cat(list(actions)).to(param.device)  # (sum L, D)
        first = np.concatenate([[0], np.cumsum(lengths)[:-1]])  # (N,) offset of each action in `frames`
        N, L_max = lengths.size, int(lengths.max())
        table = frames.new_zeros(N, L_max)  # (N, L_max) output at (action, frame)
        if self.position_encoding:
            action = np.repeat(np.arange(N), lengths)  # one segment per prefix
            seg_len = np.arange(lengths.sum()) - first[action] + 1
            order = np.argsort(seg_len, kind="stable")
            for chunk in _chunks(seg_len[order], max_chunk_frames, self._quadratic):
                idx = order[chunk]
                segs = gather_segments(frames, first[action[idx]], seg_len[idx])  # (n, L_chunk, D)
                out = self(segs, torch.from_numpy(seg_len[idx]))  # (n,)
                rows = torch.from_numpy(action[idx]).to(frames.device)
                table[rows, torch.from_numpy(seg_len[idx] - 1).to(frames.device)] = out
        else:
            order = np.argsort(lengths, kind="stable")
            for chunk in _chunks(lengths[order], max_chunk_frames, self._quadratic):
                idx = order[chunk]
                segs = gather_segments(frames, first[idx], lengths[idx])  # (n, L_chunk, D)
                lengths_t = torch.from_numpy(lengths[idx]).to(frames.device)
                valid = torch.arange(segs.shape[1], device=frames.device)[None] < lengths_t[:, None]
                out = self.fc(self._frame_features(segs, valid)).squeeze(-1)  # (n, L_chunk)
                table[torch.from_numpy(idx).to(frames.device), : segs.shape[1]] = out
        lengths_t = torch.from_numpy(lengths).to(frames.device)
        valid = torch.arange(L_max, device=frames.device)[None] < lengths_t[:, None]  # (N, L_max)
        if self.delta_output:
            table = torch.where(valid, table, 0.0).cumsum(1).clamp(0.0, 1.0)
        return table[valid]  # (sum L,), row-major = actions in order


def _chunks(sorted_lengths: np.ndarray, budget: int, quadratic: float = 0.0) -> list[slice]:
    """Consecutive groups of ascending lengths whose padded size, count * L * max(1, quadratic * L) frames
    (L the group's longest), stays <= budget; at least one item each. `quadratic` = heads / width makes
    a transformer's (heads, L, L) attention scores count. A loop over chunks, not items."""
    out, start, n = [], 0, sorted_lengths.size
    per_item = sorted_lengths * np.maximum(1.0, quadratic * sorted_lengths)  # (n,) frames of the longest
    while start < n:
        cost = np.arange(1, n - start + 1) * per_item[start:]  # (n - start,) padded size if cut here
        stop = start + max(1, int(np.searchsorted(cost, budget, side="right")))
        out.append(slice(start, stop))
        start = stop
    return out
