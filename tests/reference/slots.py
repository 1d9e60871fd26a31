"""Loop references for the slot losses: one (video, step, slot) term at a time, scalars throughout.

Written for clarity, not speed; core.losses.slots is tested against these in float64.
"""

from __future__ import annotations

import math

import torch


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    dot = sum(a[d] * b[d] for d in range(len(a)))
    return dot / (torch.sqrt(sum(x * x for x in a)) * torch.sqrt(sum(x * x for x in b)))


def slot_contrastive_reference(slots: torch.Tensor, temperature: float, batch_contrast: bool) -> torch.Tensor:
    """slots (B, T, K, D). As the reference's CrossEntropyLoss over dim 1 of ss (B*T, S, S): the term
    for slot j of video b at step t+1 is -log softmax over candidates c at t of cos(c, slot_j(t+1)) /
    temperature, at c = slot_j(t). Candidates: the K slots of video b at t, or the B*K slots of every
    video at t with `batch_contrast`. Mean over all terms."""
    n_videos, n_steps, n_slots, _ = slots.shape
    terms = []
    for b in range(n_videos):
        for t in range(n_steps - 1):
            for j in range(n_slots):
                anchor = slots[b, t + 1, j]
                videos = range(n_videos) if batch_contrast else [b]
                candidates = [slots[v, t, i] for v in videos for i in range(n_slots)]
                scores = [_cosine(c, anchor) / temperature for c in candidates]
                positive = _cosine(slots[b, t, j], anchor) / temperature
                top = max(float(s.detach()) for s in scores)
                log_norm = top + torch.log(sum(torch.exp(s - top) for s in scores))
                terms.append(log_norm - positive)
    return sum(terms) / len(terms)


def feature_reconstruction_reference(reconstruction: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Mean squared error element by element, the target treated as a constant."""
    target = features.detach()
    flat_r, flat_f = reconstruction.reshape(-1), target.reshape(-1)
    return sum((flat_r[i] - flat_f[i]) ** 2 for i in range(len(flat_r))) / len(flat_r)


def slot_attention_reference(
    inputs: torch.Tensor, slots: torch.Tensor, module: torch.nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """One video's slot attention with explicit loops over slots and inputs, using `module`'s layers.

    inputs (N, D_in), slots (K, D) -> slots (K, D), masks (K, N) of the last iteration."""
    x = module.norm_inputs(inputs)
    k, v = module.to_k(x), module.to_v(x)
    n_slots, n_inputs = slots.shape[0], inputs.shape[0]
    scale = 1.0 / math.sqrt(slots.shape[1])
    for _ in range(module.iterations):
        q = module.to_q(module.norm_slots(slots))
        logits = [[(q[s] * k[n]).sum() * scale for n in range(n_inputs)] for s in range(n_slots)]
        masks = []
        for s in range(n_slots):
            row = []
            for n in range(n_inputs):
                column = [logits[r][n] for r in range(n_slots)]
                top = max(float(c.detach()) for c in column)
                row.append(torch.exp(column[s] - top) / sum(torch.exp(c - top) for c in column))
            masks.append(row)
        new_slots = []
        for s in range(n_slots):
            weights = [masks[s][n] + module.eps for n in range(n_inputs)]
            total = sum(weights)
            update = sum(weights[n] / total * v[n] for n in range(n_inputs))
            h = module.gru(update[None], slots[s][None])[0]
            new_slots.append(h + module.mlp(module.norm_mlp(h)))
        slots = torch.stack(new_slots)
    return slots, torch.stack([torch.stack(row) for row in masks])


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def vit_reference(
    state: dict[str, torch.Tensor], images: torch.Tensor, patch_size: int, num_heads: int
) -> torch.Tensor:
    """The timm / DINO ViT written out from a state dict: ImageNet-normalised patches, CLS + positions,
    pre-norm blocks (softmax attention per head, exact GELU MLP), patch tokens of the last block (no final
    norm). images (B, 3, S, S) -> (B, N, D)."""
    # the constants as a float32 module holds them
    mean = torch.tensor([0.485, 0.456, 0.406]).to(images.dtype).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).to(images.dtype).view(1, 3, 1, 1)
    x = (images - mean) / std
    b, _, s, _ = x.shape
    g = s // patch_size
    w = state["patch_embed.proj.weight"].reshape(len(state["patch_embed.proj.bias"]), -1)  # (D, 3*p*p)
    tokens = []
    for i in range(g):  # row-major patch order
        for j in range(g):
            patch = x[:, :, i * patch_size : (i + 1) * patch_size, j * patch_size : (j + 1) * patch_size]
            tokens.append(patch.reshape(b, -1) @ w.T + state["patch_embed.proj.bias"])
    h = (
        torch.cat([state["cls_token"].expand(b, 1, -1), torch.stack(tokens, dim=1)], dim=1)
        + state["pos_embed"]
    )
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    d = h.shape[-1]
    hd = d // num_heads
    for layer in range(depth):
        p = {
            k.removeprefix(f"blocks.{layer}."): v
            for k, v in state.items()
            if k.startswith(f"blocks.{layer}.")
        }
        y = _layer_norm(h, p["norm1.weight"], p["norm1.bias"])
        qkv = y @ p["attn.qkv.weight"].T + p["attn.qkv.bias"]
        q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
        heads = []
        for head in range(num_heads):
            cols = slice(head * hd, (head + 1) * hd)
            scores = q[..., cols] @ k[..., cols].transpose(1, 2) / math.sqrt(hd)
            weights = torch.exp(scores - scores.amax(-1, keepdim=True))
            heads.append(weights / weights.sum(-1, keepdim=True) @ v[..., cols])
        h = h + torch.cat(heads, dim=-1) @ p["attn.proj.weight"].T + p["attn.proj.bias"]
        y = _layer_norm(h, p["norm2.weight"], p["norm2.bias"]) @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"]
        y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
        h = h + y @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"]
    return h[:, 1:]
