"""GTCC: generalised temporal cycle-consistency (Donahue & Elhamifar, CVPR 2024, "Learning to Predict
Activity Progress by Self-Supervised Video Alignment"), batched, with the release's defects fixed.

Per ordered pair (U, V), U != V, of a batch (U has N frames, V has M):
 1. anchors: `min(n_anchors, N)` distinct frames of U, drawn once per video U and shared by all its pairs.
 2. `alpha = softmax(-cdist(U[anchors], V) / tau)` (max-shifted): a distribution over V's frames per anchor.
 3. each alpha row is fitted by a K-component discretised Gaussian mixture over V's frame axis (component k:
    `exp(-(l - mu_k)^2 / (2 var_k))` normalised over l = 0..M-1; weights `psi = softmax(w)`). The fit is
    detached: no gradient flows through it (nor through alpha, which only feeds the fit).
 4. K soft nearest neighbours `g_k @ V`; cycle back to U inside a window:
    `beta_k = softmax(-cdist(g_k V, U) / tau)` over the allowed frames, `mu_k = sum_l beta_kl l`.
 5. error `a = sum_k psi_k e_k`, `e_k = (i - mu_k)^2 [+ lambda * log(sqrt(var_k + VAR_EPS))]`.
 6. drop handling (gamma < 1): keep-probability `BX = drop_min + (1 - drop_min) * sigmoid(z)`, z the drop
    score `u_t . w_V + b_V` of U's frames under V's drop context, z-scored over U's frames,
    `drop_min = gamma^(epoch + 1)`; per-anchor loss `BX * a + (1 - BX) / a`.
 Reduction: the MEAN over all (pair, anchor) terms (the release's plain sum divided by its term count), so
 the loss scale does not grow with the batch size or the anchor count.

Decisions where the description is ambiguous (taken from the release's code):
 - anchors are uniform without replacement (the release's `randperm(N)[:20]`); videos shorter than
   n_anchors use every frame (the release raised IndexError for N < 20).
 - window: one per anchor video U, its direction drawn with probability 1/2: forward `[r, r + w)` or
   backward `[r - w, r)` (the anchor itself excluded, as in the release), plus the release's "insurance"
   blocks: anchors among the first w frames may also use the first w frames, anchors among the last w frames
   the last w frames. `w = max(1, round(N * delta))`; the release's w = 0 allowed every frame (a `-0` slice).
 - the fit is the release's: means start at `1 + k (M - 2) / K`, variances at M, equal weights; means are
   clamped to [0, M - 1] and variances to >= 0.5 inside the mixture; objective `KL(p||q) + KL(q||p)` with
   1e-30 inside the logs (the release also computes an "intensity" term that it never uses: omitted);
   optimiser `torch.optim.LBFGS(lr=0.5, history_size=10, max_iter=4, line_search_fn="strong_wolfe")`
   stepped `max_gmm_iters` times. `_lbfgs` reproduces that optimiser per row (same directions, line-search
   decisions and stopping tests), so in float64 the fits agree with a per-row torch LBFGS to ~1e-9. In
   float32 (the release's and the training dtype) this ill-conditioned fit amplifies rounding: two correct
   implementations end at slightly different fits and the loss can differ by ~1e-4..1e-2 relative.
 - the fit runs in the embeddings' dtype (at least float32), as in the release.
 - cycle-back softmax: max-shifted and masked; the release's `+ 1e-6` in the denominator is dropped (after
   the shift the sum is >= 1).
 - variance term: `0.5 * log(var + VAR_EPS)` instead of the release's `log(sqrt(var) + 1e-20)` (whose
   gradient is infinite at var = 0); only when alignment_variance > 0.
 - drop z-score: the release's unbiased std, floored at DROP_STD_EPS (identical frames give std 0); drop
   handling only runs for gamma < 1, as in the release (gamma = 1 means BX = 1: the loss is `a`, and the drop
   contexts receive no gradient).
 - the reciprocal term divides by `max(a, RECIPROCAL_EPS)`: the release's `1 / a` is infinite for a perfect
   cycle (a = 0) and meaningless for a < 0 (possible with the variance term).
 - a batch of one video has no pair: the loss is a zero that belongs to the graph.
Fixed release defects: IndexError for N < 20; process exit when a fit goes non-finite (here the row falls
back to one moment-matched Gaussian, counted in FIT_STATS and warned about); softmax without the max shift;
plain sum instead of mean. Randomness comes only from `generator` (the release mixed torch's and numpy's
global RNGs).

Speed: all anchors of all pairs are fitted in ONE batched optimisation (rows are independent, so each keeps
its own L-BFGS state and line search; objective and gradient are computed in closed form, only for the rows
that need an evaluation), and the rest is a handful of batched tensor ops over padded videos.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from core.losses.pairs import ordered_pairs, pad_sequences
from core.losses.tcc import VAR_EPS, masked_softmax

LOG_EPS = 1e-30  # the release's epsilon inside the logs of the symmetric KL
MIN_GMM_VAR = 0.5  # the release's floor on a component's variance (frames^2)
DROP_STD_EPS = 1e-6  # floor on the std of the drop scores (identical frames)
RECIPROCAL_EPS = 1e-6  # floor on the error in the `(1 - BX) / a` term (frames^2)
# the release's torch.optim.LBFGS settings, and torch's defaults for the rest
LBFGS_LR = 0.5
LBFGS_HISTORY = 10
LBFGS_MAX_ITER = 4
LBFGS_MAX_EVAL = LBFGS_MAX_ITER * 5 // 4
TOLERANCE_GRAD = 1e-7
TOLERANCE_CHANGE = 1e-9
WOLFE_C1 = 1e-4
WOLFE_C2 = 0.9
HISTORY_MIN_CURVATURE = 1e-10

# Cumulative since import: "rows" = anchor rows fitted, "fallbacks" = rows whose fit went non-finite and were
# replaced by a moment-matched Gaussian. A trainer may log and clear it.
FIT_STATS: Counter[str] = Counter()

Objective = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class AnchorSample(NamedTuple):
    """The random choices of one GTCC evaluation, per video of the batch."""

    anchors: torch.Tensor  # (B, A) long, ascending frame indices; padding entries are 0
    anchor_mask: torch.Tensor  # (B, A) bool, True on real anchors
    backward: torch.Tensor  # (B,) bool: the cycle-back window looks back from the anchor instead of forward


def sample_anchors(
    lengths: torch.Tensor, n_anchors: int, *, generator: torch.Generator | None = None
) -> AnchorSample:
    """Draw each video's anchor frames (`min(n_anchors, N)` without replacement) and window direction.

    Draws only from `generator` (torch's global RNG when None), on the generator's device, so that a run
    resumed from a saved generator state repeats the same draws.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    lengths_d = lengths.to(device)
    batch, frames = lengths_d.shape[0], int(lengths_d.max())
    count = lengths_d.clamp(max=n_anchors)  # (B,)
    columns = int(count.max())
    keys = torch.rand(batch, frames, generator=generator, device=device)  # (B, T)
    keys = keys.masked_fill(torch.arange(frames, device=device) >= lengths_d[:, None], 2.0)  # padding last
    chosen = keys.argsort(dim=1)[:, :columns]  # (B, A): a uniform random subset in random order
    anchor_mask = torch.arange(columns, device=device) < count[:, None]  # (B, A)
    anchors = chosen.masked_fill(~anchor_mask, frames).sort(dim=1).values.masked_fill(~anchor_mask, 0)
    backward = torch.randint(0, 2, (batch,), generator=generator, device=device).bool()  # (B,)
    return AnchorSample(
        anchors.to(lengths.device), anchor_mask.to(lengths.device), backward.to(lengths.device)
    )


def anchor_windows(
    lengths: torch.Tensor, anchors: torch.Tensor, backward: torch.Tensor, delta: float
) -> torch.Tensor:
    """Frames of its own video that each anchor may cycle back to: (B, A, T) bool (see module docstring)."""
    frames = int(lengths.max())
    n = lengths[:, None, None]  # (B, 1, 1)
    width = torch.round(lengths.double() * delta).clamp_min(1).long()[:, None, None]  # Python's round()
    shift = width * backward[:, None, None]  # (B, 1, 1): 0 forward, w backward
    row = anchors[..., None]  # (B, A, 1)
    col = torch.arange(frames, device=lengths.device)  # (T,)
    window = (col >= row - shift) & (col < row + width - shift)
    corners = ((row < width) & (col < width)) | ((row >= n - width) & (col >= n - width))
    return (window | corners) & (col < n)


def _cubic_minimum(
    x1: torch.Tensor,
    f1: torch.Tensor,
    g1: torch.Tensor,
    x2: torch.Tensor,
    f2: torch.Tensor,
    g2: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
) -> torch.Tensor:
    """Row-wise minimiser of the cubic through two points and slopes, clamped to [low, high] (as torch)."""
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    d2_square = d1**2 - g1 * g2
    d2 = d2_square.clamp_min(0).sqrt()
    minimum = torch.where(
        x1 <= x2,
        x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2)),
        x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2)),
    )
    return torch.where(d2_square >= 0, torch.minimum(torch.maximum(minimum, low), high), (low + high) / 2)


def _gather_slot(values: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """values[r, slot[r]] for values (R, 2, ...) -> (R, ...)."""
    index = slot.view(-1, 1, *([1] * (values.dim() - 2))).expand(-1, 1, *values.shape[2:])
    return values.gather(1, index).squeeze(1)


def _strong_wolfe(
    objective: Objective,
    x: torch.Tensor,
    t: torch.Tensor,
    d: torch.Tensor,
    f: torch.Tensor,
    g: torch.Tensor,
    gtd: torch.Tensor,
    max_ls: torch.Tensor,
    active: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.optim.lbfgs._strong_wolfe run independently for each `active` row, all rows evaluated together.

    Each row is a small state machine (bracketing, then zoom); every round evaluates the objective once for
    each row that needs a trial point. Returns (f, g, t, evaluations) per row; inactive rows are garbage.
    """
    rows = x.shape[0]
    d_norm = d.abs().amax(1)

    def evaluate(step: torch.Tensor, need: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = need.nonzero().squeeze(1)
        f_sub, g_sub = objective(x[index] + step[index, None] * d[index], index)
        return f.new_zeros(rows).index_copy(0, index, f_sub), g.new_zeros(g.shape).index_copy(0, index, g_sub)

    f_new, g_new = evaluate(t, active)
    gtd_new = (g_new * d).sum(1)
    evals = active.long()
    ls_iter = torch.zeros_like(evals)
    t_prev, f_prev, g_prev, gtd_prev = torch.zeros_like(t), f, g, gtd
    bracketing, zooming = active.clone(), torch.zeros_like(active)
    done, insufficient = torch.zeros_like(active), torch.zeros_like(active)
    b_t, b_f, b_gtd = (torch.zeros(rows, 2, dtype=x.dtype, device=x.device) for _ in range(3))  # (R, 2)
    b_g = torch.zeros(rows, 2, x.shape[1], dtype=x.dtype, device=x.device)  # (R, 2, n)
    low = torch.zeros_like(evals)
    while True:
        # -- bracketing phase: check the latest trial of each bracketing row
        exhausted = bracketing & (ls_iter >= max_ls)
        live = bracketing & ~exhausted
        armijo_fails = (f_new > f + WOLFE_C1 * t * gtd) | ((ls_iter > 1) & (f_new >= f_prev))
        curvature_ok = gtd_new.abs() <= -WOLFE_C2 * gtd
        wolfe = live & ~armijo_fails & curvature_ok
        bracketed = live & (armijo_fails | (~curvature_ok & (gtd_new >= 0)))
        extend = live & ~wolfe & ~bracketed
        settled = (exhausted | wolfe | bracketed)[:, None]  # (R, 1)
        b_t = torch.where(
            settled,
            torch.stack([torch.where(bracketed, t_prev, torch.where(wolfe, t, 0.0)), t], 1),
            b_t,
        )
        b_f = torch.where(
            settled,
            torch.stack([torch.where(bracketed, f_prev, torch.where(wolfe, f_new, f)), f_new], 1),
            b_f,
        )
        b_gtd = torch.where(settled, torch.stack([gtd_prev, gtd_new], 1), b_gtd)  # unused unless bracketed
        first_g = torch.where(bracketed[:, None], g_prev, torch.where(wolfe[:, None], g_new, g))
        b_g = torch.where(settled[..., None], torch.stack([first_g, g_new], 1), b_g)
        low = torch.where(settled[:, 0], (~(b_f[:, 0] <= b_f[:, 1])).long(), low)
        done |= wolfe
        bracketing &= ~settled[:, 0]
        zooming |= settled[:, 0]
        t_next = _cubic_minimum(t_prev, f_prev, gtd_prev, t, f_new, gtd_new, t + 0.01 * (t - t_prev), t * 10)
        t_prev = torch.where(extend, t, t_prev)
        f_prev = torch.where(extend, f_new, f_prev)
        g_prev = torch.where(extend[:, None], g_new, g_prev)
        gtd_prev = torch.where(extend, gtd_new, gtd_prev)
        t = torch.where(extend, t_next, t)
        # -- zoom phase: choose the next trial inside each bracket
        b_min, b_max = b_t.amin(1), b_t.amax(1)
        finished = zooming & (
            done | (ls_iter >= max_ls) | ((b_t[:, 1] - b_t[:, 0]).abs() * d_norm < TOLERANCE_CHANGE)
        )
        zooming &= ~finished
        t_zoom = _cubic_minimum(
            b_t[:, 0], b_f[:, 0], b_gtd[:, 0], b_t[:, 1], b_f[:, 1], b_gtd[:, 1], b_min, b_max
        )
        eps = 0.1 * (b_max - b_min)
        near_edge = torch.minimum(b_max - t_zoom, t_zoom - b_min) < eps
        pushed = near_edge & (insufficient | (t_zoom >= b_max) | (t_zoom <= b_min))
        nearer_max = (t_zoom - b_max).abs() < (t_zoom - b_min).abs()
        t_zoom = torch.where(pushed, torch.where(nearer_max, b_max - eps, b_min + eps), t_zoom)
        insufficient = torch.where(zooming, near_edge & ~pushed, insufficient)
        t = torch.where(zooming, t_zoom, t)
        need = extend | zooming
        if not bool(need.any()):
            break
        f_eval, g_eval = evaluate(t, need)
        gtd_eval = (g_eval * d).sum(1)
        evals += need
        ls_iter += need
        f_new = torch.where(extend, f_eval, f_new)
        g_new = torch.where(extend[:, None], g_eval, g_new)
        gtd_new = torch.where(extend, gtd_eval, gtd_new)
        # -- zoom phase: shrink each bracket around its new trial
        low_t, low_f = _gather_slot(b_t, low), _gather_slot(b_f, low)
        low_gtd, low_g = _gather_slot(b_gtd, low), _gather_slot(b_g, low)
        to_high = zooming & ((f_eval > f + WOLFE_C1 * t * gtd) | (f_eval >= low_f))
        to_low = zooming & ~to_high
        wolfe_zoom = to_low & (gtd_eval.abs() <= -WOLFE_C2 * gtd)
        high_t = _gather_slot(b_t, 1 - low)
        swap = to_low & ~wolfe_zoom & (gtd_eval * (high_t - low_t) >= 0)
        is_low = torch.arange(2, device=x.device) == low[:, None]  # (R, 2)
        old_low = ~is_low & swap[:, None]  # the high slot takes the old low point
        b_t = torch.where(old_low, low_t[:, None], b_t)
        b_f = torch.where(old_low, low_f[:, None], b_f)
        b_gtd = torch.where(old_low, low_gtd[:, None], b_gtd)
        b_g = torch.where(old_low[..., None], low_g[:, None], b_g)
        new = (~is_low & to_high[:, None]) | (is_low & to_low[:, None])  # the slot that takes the new point
        b_t = torch.where(new, t[:, None], b_t)
        b_f = torch.where(new, f_eval[:, None], b_f)
        b_gtd = torch.where(new, gtd_eval[:, None], b_gtd)
        b_g = torch.where(new[..., None], g_eval[:, None], b_g)
        low = torch.where(to_high, (~(b_f[:, 0] <= b_f[:, 1])).long(), low)
        done |= wolfe_zoom
    return _gather_slot(b_f, low), _gather_slot(b_g, low), _gather_slot(b_t, low), evals


def _lbfgs(objective: Objective, x: torch.Tensor, n_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n_steps` calls of torch.optim.LBFGS.step (release settings) on every row of `x` (R, n) at once.

    Rows are independent problems: each keeps its own history, step size, line search and stopping tests,
    exactly as if it had its own optimiser. `objective(x_rows, row_index)` returns (f, grad) for those rows.
    Returns the final parameters and objective values.
    """
    rows, n = x.shape
    every_row = torch.arange(rows, device=x.device)
    f, g = objective(x, every_row)  # (R,), (R, n); also the value torch re-evaluates at each step's start
    n_iter = torch.zeros(rows, dtype=torch.long, device=x.device)
    d, prev_g = torch.zeros_like(x), torch.zeros_like(x)
    t, prev_f, h_diag = torch.zeros_like(f), torch.zeros_like(f), torch.ones_like(f)
    dirs = torch.zeros(rows, LBFGS_HISTORY, n, dtype=x.dtype, device=x.device)  # oldest first
    steps, rho = torch.zeros_like(dirs), torch.zeros(rows, LBFGS_HISTORY, dtype=x.dtype, device=x.device)
    n_hist = torch.zeros_like(n_iter)
    slots = torch.arange(LBFGS_HISTORY, device=x.device)
    for _ in range(n_steps):
        evals = torch.ones_like(n_iter)
        running = ~(g.abs().amax(1) <= TOLERANCE_GRAD)
        for _ in range(LBFGS_MAX_ITER):
            if not bool(running.any()):
                break
            n_iter += running
            first = running & (n_iter == 1)
            update = running & ~first
            # memory update with the last step's curvature pair
            y, s = g - prev_g, d * t[:, None]
            ys = (y * s).sum(1)
            push = update & (ys > HISTORY_MIN_CURVATURE)
            full = n_hist == LBFGS_HISTORY
            shift = (push & full)[:, None, None]
            dirs = torch.where(shift, dirs.roll(-1, dims=1), dirs)
            steps = torch.where(shift, steps.roll(-1, dims=1), steps)
            rho = torch.where(shift[..., 0], rho.roll(-1, dims=1), rho)
            slot = (slots == n_hist.clamp(max=LBFGS_HISTORY - 1)[:, None]) & push[:, None]  # (R, H)
            dirs = torch.where(slot[..., None], y[:, None], dirs)
            steps = torch.where(slot[..., None], s[:, None], steps)
            rho = torch.where(slot, 1.0 / ys[:, None], rho)
            n_hist = torch.where(push & ~full, n_hist + 1, n_hist)
            h_diag = torch.where(push, ys / (y * y).sum(1), h_diag)
            # two-loop recursion over each row's own history (empty slots are skipped)
            q = -g
            alphas = [torch.zeros_like(f)] * LBFGS_HISTORY
            for i in reversed(range(LBFGS_HISTORY)):
                alphas[i] = torch.where(i < n_hist, (steps[:, i] * q).sum(1) * rho[:, i], 0.0)
                q = q - alphas[i][:, None] * dirs[:, i]
            r = q * h_diag[:, None]
            for i in range(LBFGS_HISTORY):
                beta_i = (dirs[:, i] * r).sum(1) * rho[:, i]
                r = r + torch.where(i < n_hist, alphas[i] - beta_i, 0.0)[:, None] * steps[:, i]
            d = torch.where(first[:, None], -g, torch.where(update[:, None], r, d))
            prev_g = torch.where(running[:, None], g, prev_g)
            prev_f = torch.where(running, f, prev_f)
            t_first = (1.0 / g.abs().sum(1)).clamp(max=1.0) * LBFGS_LR
            t = torch.where(running, torch.where(first, t_first, LBFGS_LR), t)
            gtd = (g * d).sum(1)
            running &= ~(gtd > -TOLERANCE_CHANGE)
            if not bool(running.any()):
                break
            f_ls, g_ls, t_ls, ls_evals = _strong_wolfe(
                objective, x, t, d, f, g, gtd, LBFGS_MAX_EVAL - evals, running
            )
            x = torch.where(running[:, None], x + t_ls[:, None] * d, x)
            f = torch.where(running, f_ls, f)
            g = torch.where(running[:, None], g_ls, g)
            t = torch.where(running, t_ls, t)
            evals += torch.where(running, ls_evals, 0)
            stop = (
                (evals >= LBFGS_MAX_EVAL)
                | (g.abs().amax(1) <= TOLERANCE_GRAD)
                | ((d * t[:, None]).abs().amax(1) <= TOLERANCE_CHANGE)
                | ((f - prev_f).abs() < TOLERANCE_CHANGE)
            )
            running &= ~stop
    return x, f


def _mixture(
    params: torch.Tensor, lengths: torch.Tensor, frames: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Discretised Gaussian mixture of each row over its first `lengths[r]` frames.

    `params` (R, 3K) = [means, variances, weight logits]. Returns the normalised components g (R, K, M), the
    weights psi (R, K), and for the gradient `l - mu` (R, K, M), `(l - mu)^2 / var` (R, K, M), var (R, K),
    all after the release's clamps.
    """
    mean, var, logit = params.chunk(3, dim=1)  # (R, K) each
    idx = torch.arange(frames, dtype=params.dtype, device=params.device)  # (M,)
    top = (lengths - 1).to(params.dtype)[:, None]  # (R, 1)
    var = var.clamp_min(MIN_GMM_VAR)
    diff = idx - torch.minimum(mean.clamp_min(0.0), top)[..., None]  # (R, K, M)
    scaled = diff.square().div_(var[..., None])  # (R, K, M)
    # The exponent is floored just above the smallest normal number: denormal results make exp ~10x slower
    # on CPUs, and densities that small vanish next to the 1e-30 inside the KL's logs anyway.
    exp_floor = math.log(torch.finfo(params.dtype).tiny) + 1.0
    density = scaled.mul(-0.5).clamp_min_(exp_floor).exp_()
    density.mul_(idx < lengths[:, None, None])  # only the row's real frames
    # the release's 1 / (std sqrt(2 pi)) factor cancels in the normalisation
    g = density.div_(density.sum(-1, keepdim=True))
    return g, torch.softmax(logit, dim=-1), diff, scaled, var


def _gmm_objective(
    params: torch.Tensor, p: torch.Tensor, log_p: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric KL `KL(p||q) + KL(q||p)` of each row (R,) and its gradient w.r.t. `params` (R, 3K).

    Closed form, so that an evaluation costs a few passes over (R, K, M) instead of an autograd graph.
    """
    g, psi, diff, scaled, var = _mixture(params, lengths, p.shape[1])
    q = (psi[:, None, :] @ g).squeeze(1)  # (R, M)
    log_q = torch.log(q + LOG_EPS)
    value = (p * (log_p - log_q)).sum(-1) + (q * (log_q - log_p)).sum(-1)  # (R,)
    d_q = (q - p) / (q + LOG_EPS) + log_q - log_p  # (R, M)
    d_psi = (g @ d_q[..., None]).squeeze(-1)  # (R, K)
    # derivative w.r.t. each component's log-density -(l - mu)^2 / (2 var), through the normalisation
    d_log_density = (d_q[:, None, :] - d_psi[..., None]).mul_(g).mul_(psi[..., None])  # (R, K, M)
    mean, raw_var, _ = params.chunk(3, dim=1)
    top = (lengths - 1).to(params.dtype)[:, None]
    d_mean = torch.where((mean >= 0) & (mean <= top), torch.linalg.vecdot(d_log_density, diff) / var, 0.0)
    d_var = torch.where(raw_var >= MIN_GMM_VAR, 0.5 * torch.linalg.vecdot(d_log_density, scaled) / var, 0.0)
    d_logit = psi * (d_psi - (psi * d_psi).sum(-1, keepdim=True))
    return value, torch.cat([d_mean, d_var, d_logit], dim=1)


def fit_mixtures(
    p: torch.Tensor, lengths: torch.Tensor, n_components: int, max_iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit every row of `p` (R, M), a distribution over its first `lengths[r]` frames, by the release's GMM.

    Returns (components (R, K, M), weights (R, K)), detached. A row whose fit ends non-finite gets one
    moment-matched Gaussian (all K components equal, equal weights) instead, and is counted in FIT_STATS.
    """
    p = p.detach()
    rows, frames = p.shape
    k = n_components
    top = lengths.to(torch.float64)[:, None]  # (R, 1)
    means = (1 + torch.arange(k, dtype=torch.float64, device=p.device) * (top - 2) / k).to(p.dtype)
    params = torch.cat([means, top.expand(-1, k).to(p.dtype), torch.ones_like(means)], dim=1)  # (R, 3K)
    log_p = torch.log(p + LOG_EPS)
    params, value = _lbfgs(
        lambda x, index: _gmm_objective(x, p[index], log_p[index], lengths[index]), params, max_iters
    )
    failed = ~(torch.isfinite(value) & torch.isfinite(params).all(1))
    FIT_STATS["rows"] += rows
    if bool(failed.any()):
        n_failed = int(failed.sum())
        FIT_STATS["fallbacks"] += n_failed
        warnings.warn(
            f"GTCC: {n_failed} of {rows} mixture fits went non-finite; used a moment-matched Gaussian",
            RuntimeWarning,
            stacklevel=3,
        )
        idx = torch.arange(frames, dtype=p.dtype, device=p.device)
        mean = (p * idx).sum(-1, keepdim=True)  # (R, 1)
        var = (p * (idx - mean) ** 2).sum(-1, keepdim=True)
        moments = torch.cat([mean.expand(-1, k), var.expand(-1, k), torch.zeros_like(means)], dim=1)
        params = torch.where(failed[:, None], moments, params)
    g, psi, *_ = _mixture(params, lengths, frames)
    return g, psi


def _keep_probability(
    x: torch.Tensor,
    mask: torch.Tensor,
    lengths: torch.Tensor,
    dropouts: Sequence[torch.Tensor],
    first: torch.Tensor,
    second: torch.Tensor,
    anchors: torch.Tensor,
    drop_min: float,
) -> torch.Tensor:
    """BX of each pair's anchors (P, A): z-scored drop score of U's frames under V's drop context."""
    context = torch.stack(list(dropouts)).to(x.dtype)  # (B, D + 1)
    score = x @ context[:, :-1].T + context[:, -1]  # (B, T, B): frame t of video i under video j's context
    real = mask[..., None]  # (B, T, 1)
    n = lengths.to(x.dtype)[:, None, None]  # (B, 1, 1)
    mean = torch.where(real, score, 0.0).sum(1, keepdim=True) / n  # (B, 1, B)
    var = torch.where(real, score - mean, 0.0).pow(2).sum(1, keepdim=True) / (n - 1).clamp_min(1)
    z = (score - mean) / var.clamp_min(DROP_STD_EPS**2).sqrt()  # (B, T, B)
    z_anchor = z[first, :, second].gather(1, anchors)  # (P, A)
    return drop_min + (1 - drop_min) * torch.sigmoid(z_anchor)


def gtcc_loss(
    sequences: list[torch.Tensor],
    dropouts: list[torch.Tensor] | None,
    *,
    n_components: int,
    gamma: float,
    delta: float,
    softmax_temp: float = 0.1,
    alignment_variance: float = 0.0,
    max_gmm_iters: int = 8,
    epoch: int = 0,
    n_anchors: int = 20,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """GTCC loss of one batch (scalar): mean over ordered pairs i != j and their anchors.

    `sequences` are (T_i, D) embeddings, `dropouts` one (D + 1,) drop context per video (weights, then bias;
    unused, and may be None, when gamma == 1). See the module docstring for the algorithm and decisions.
    """
    if not 0 < delta <= 1:
        raise ValueError(f"delta must be in (0, 1], got {delta}")
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    if n_components < 1 or n_anchors < 1:
        raise ValueError("n_components and n_anchors must be >= 1")
    if gamma < 1 and (dropouts is None or len(dropouts) != len(sequences)):
        raise ValueError("gamma < 1 needs one drop context per video")
    x, mask, lengths = pad_sequences(sequences)  # (B, T, D), (B, T), (B,)
    x = x.to(torch.promote_types(x.dtype, torch.float32))  # AMP may hand us half
    batch, frames, dim = x.shape
    if batch < 2:
        return x.sum() * 0.0  # no pair: a zero that still belongs to the graph
    sample = sample_anchors(lengths, n_anchors, generator=generator)
    window = anchor_windows(lengths, sample.anchors, sample.backward, delta)  # (B, A, T)
    first, second = ordered_pairs(batch, include_self=False, device=x.device)
    u, v = x[first], x[second]  # (P, T, D) each
    anchors, real = sample.anchors[first], sample.anchor_mask[first]  # (P, A) each
    pairs, n_anchor = anchors.shape
    u_anchor = u.gather(1, anchors[..., None].expand(-1, -1, dim))  # (P, A, D)
    with torch.no_grad():
        alpha = masked_softmax(
            -torch.cdist(u_anchor, v) / softmax_temp, mask[second][:, None, :]
        )  # (P, A, T)
        rows = real.reshape(-1)  # fit real anchors only
        row_lengths = lengths[second][:, None].expand(-1, n_anchor).reshape(-1)[rows]
        g_fit, psi_fit = fit_mixtures(
            alpha.reshape(-1, frames)[rows], row_lengths, n_components, max_gmm_iters
        )
        g = x.new_zeros(pairs * n_anchor, n_components, frames)
        psi = x.new_zeros(pairs * n_anchor, n_components)
        g[rows], psi[rows] = g_fit, psi_fit
    snn = g.view(pairs, n_anchor * n_components, frames) @ v  # (P, A*K, D)
    allowed = window[first].repeat_interleave(n_components, dim=1)  # (P, A*K, T)
    beta = masked_softmax(-torch.cdist(snn, u) / softmax_temp, allowed)  # (P, A*K, T)
    beta = beta.view(pairs, n_anchor, n_components, frames)
    idx = torch.arange(frames, dtype=x.dtype, device=x.device)  # (T,)
    mu = beta @ idx  # (P, A, K)
    error = (anchors.to(x.dtype)[..., None] - mu) ** 2  # (P, A, K)
    if alignment_variance > 0:
        var = (beta * (idx - mu[..., None]) ** 2).sum(-1) + VAR_EPS
        error = error + alignment_variance * 0.5 * torch.log(var)
    align = (psi.view(pairs, n_anchor, n_components) * error).sum(-1)  # (P, A)
    per_anchor = align
    if gamma < 1:
        keep = _keep_probability(
            x, mask, lengths, dropouts, first, second, anchors, drop_min=gamma ** (epoch + 1)
        )  # (P, A)
        per_anchor = keep * align + (1 - keep) / align.clamp_min(RECIPROCAL_EPS)
    return torch.where(real, per_anchor, 0.0).sum() / real.sum()
