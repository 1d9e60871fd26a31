"""The slots family: frozen (or fine-tuned) ViT + slot attention + SlotContrast, as a loop `Task`.

Training strategies (`optim.strategy`): `frozen` (the backbone gets no gradient and is not optimised),
`finetune` (the backbone trains at `optim.backbone_lr`), `two_stage` (finetune, initialised from a stage-1
run given as `model.init_from`). Per-module learning rates come from `optim.param_groups` (regex on parameter
names, e.g. `grouper\\..*`), the schedule from `optim.warmup_epochs` / `decay_rate` / `decay_epochs`; the
shared loop takes both from `Task.param_groups()` and `Task.lr_factor(epoch)`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from core.atomic import atomic_write_json
from core.data.errors import DataError
from core.data.multi_object import DATA_KINDS, ObjectVideo, batch_videos, load_object_videos, split_videos
from core.data.splits import SPLIT_NAMES, Handle, Splits, resolve_splits, save_splits, select
from core.losses.slots import feature_reconstruction_loss, slot_contrastive_loss
from core.metrics.segmentation import hungarian_miou, masks_to_labels, mbo, random_mask_baseline, video_ari
from core.models.backbone import ViTBackbone, load_vit_checkpoint
from core.models.slots import (
    INITIALIZERS,
    FeatureTransform,
    MLPDecoder,
    SlotAttention,
    SlotInitializer,
    SlotModel,
    TemporalPredictor,
    patch_grid,
    upsample_masks,
)
from core.train.checkpoint import load_checkpoint
from core.train.loop import Task
from core.train.slots_plots import plot_slot_masks, plot_slots_history

log = logging.getLogger(__name__)

STRATEGIES = ("frozen", "finetune", "two_stage")
MASK_SOURCES = ("decoder", "grouper")  # which masks the segmentation metrics and plots read
LOSSES = ("total_loss", "featrec_loss", "contrastive_loss")
SEGMENTATION_METRICS = ("fg_ari", "video_ari", "mbo", "miou")
BASELINES = ("random", "grid")  # core.metrics.segmentation.random_mask_baseline kinds: blobs, grid
_BASELINE_KIND = {"random": "blobs", "grid": "grid"}


# ---------------------------------------------------------------- config


def has_masks(cfg: DictConfig) -> bool:
    """Segmentation metrics need ground-truth masks: synthetic data has them, frame folders when given."""
    return cfg.data.kind == "synthetic" or cfg.data.get("masks_dir") is not None


def logged_metrics(cfg: DictConfig) -> set[str]:
    """Every metric name a run of `cfg` logs, so a sweep can reject an objective that never appears."""
    names = {f"{split}/{k}" for split in ("train", "val") for k in LOSSES}
    if has_masks(cfg):
        names |= {f"val/{k}" for k in SEGMENTATION_METRICS}
        names |= {
            f"{split}/{k}{suffix}"
            for split in ("val", "test")
            for k in SEGMENTATION_METRICS
            for suffix in ("", *(f"_{b}" for b in BASELINES))
        }
    return names


def build_model(cfg: DictConfig) -> SlotModel:
    """The SlotModel of `cfg.model` with the backbone frozen or not by `optim.strategy` (random init)."""
    m, b = cfg.model, cfg.model.backbone
    backbone = ViTBackbone(
        img_size=b.img_size,
        patch_size=b.patch_size,
        embed_dim=b.embed_dim,
        depth=b.depth,
        num_heads=b.num_heads,
        mlp_ratio=b.mlp_ratio,
        layer_scale=b.layer_scale,
    )
    f = m.feature_transform
    return SlotModel(
        backbone,
        FeatureTransform(b.embed_dim, f.output_dim, f.hidden_dim),
        SlotInitializer(m.num_slots, m.slot_dim, m.initializer),
        SlotAttention(f.output_dim, m.slot_dim, m.grouper.iterations, m.grouper.hidden_dim, m.grouper.eps),
        TemporalPredictor(m.slot_dim, m.predictor.depth, m.predictor.num_heads),
        MLPDecoder(m.slot_dim, b.embed_dim, backbone.num_patches, list(m.decoder.hidden_dims)),
        freeze_backbone=cfg.optim.strategy == "frozen",
    )


def build_param_groups(
    model: torch.nn.Module, base_lr: float, backbone_lr: float, patterns: Sequence[tuple[str, float]]
) -> list[dict[str, Any]]:
    """Optimiser param groups of the trainable parameters, the default group first (the logged `lr`).

    A parameter goes to the first `(regex, lr)` whose regex matches its full name, else to `backbone` (at
    `backbone_lr`) when it is a backbone parameter, else to `default` (at `base_lr`). Empty groups are
    dropped."""
    groups = {"default": {"name": "default", "lr": base_lr, "params": []}}
    for i, (pattern, lr) in enumerate(patterns):
        groups[f"pattern{i}"] = {"name": pattern, "lr": lr, "params": []}
    groups["backbone"] = {"name": "backbone", "lr": backbone_lr, "params": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        matched = (f"pattern{i}" for i, (pattern, _) in enumerate(patterns) if re.fullmatch(pattern, name))
        key = next(matched, "backbone" if name.startswith("backbone.") else "default")
        groups[key]["params"].append(param)
    return [g for g in groups.values() if g["params"]]


def _pattern_list(cfg: DictConfig) -> list[tuple[str, float]]:
    return [(str(g.pattern), float(g.lr)) for g in cfg.optim.param_groups]


def resolve_init_from(path: str | Path) -> Path:
    """A stage-1 checkpoint file, or a run dir -> its evaluated best checkpoint (else its last.pt)."""
    path = Path(path)
    if path.is_file():
        return path
    for name in ("best_model_best.pt", "last.pt"):
        if (path / "checkpoints" / name).is_file():
            return path / "checkpoints" / name
    raise ValueError(
        f"model.init_from={str(path)!r}: neither a checkpoint file nor a run dir with "
        "checkpoints/best_model_best.pt or checkpoints/last.pt"
    )


def check_config(cfg: DictConfig) -> None:
    """Reject a config that cannot train before anything is written; ValueError names the key."""
    problems = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            problems.append(msg)

    def positive_int(key: str) -> bool:
        value = OmegaConf.select(cfg, key)
        ok = isinstance(value, int) and value >= 1
        need(ok, f"{key} must be an integer >= 1, got {value!r}")
        return ok

    for section in ("optim", "loss.slots", "model.backbone"):
        if OmegaConf.select(cfg, section) is None:
            raise ValueError(
                f"{section}: missing; the slots family needs model=slots*, trainer=slots and loss/slots"
            )
    m, b, o, ls, d = cfg.model, cfg.model.backbone, cfg.optim, cfg.loss.slots, cfg.data
    sizes_ok = all(
        positive_int(k)
        for k in (
            "model.backbone.img_size",
            "model.backbone.patch_size",
            "model.backbone.embed_dim",
            "model.backbone.depth",
            "model.backbone.num_heads",
            "model.num_slots",
            "model.slot_dim",
            "model.grouper.iterations",
            "model.predictor.depth",
            "model.predictor.num_heads",
        )
    )
    if sizes_ok:
        need(b.img_size % b.patch_size == 0, "model.backbone.img_size must be a multiple of patch_size")
        need(b.embed_dim % b.num_heads == 0, "model.backbone.embed_dim must be divisible by num_heads")
        need(
            m.slot_dim % m.predictor.num_heads == 0,
            "model.slot_dim must be divisible by model.predictor.num_heads",
        )
    need(m.initializer in INITIALIZERS, f"model.initializer must be one of {list(INITIALIZERS)}")
    need(m.eval_masks in MASK_SOURCES, f"model.eval_masks must be one of {list(MASK_SOURCES)}")
    if b.checkpoint is not None:
        need(Path(str(b.checkpoint)).is_file(), f"model.backbone.checkpoint={b.checkpoint!r}: no such file")
    need(o.strategy in STRATEGIES, f"optim.strategy must be one of {list(STRATEGIES)}, got {o.strategy!r}")
    if o.strategy == "two_stage":
        need(m.init_from is not None, "optim.strategy=two_stage needs model.init_from (the stage-1 run)")
    if m.init_from is not None:
        try:
            resolve_init_from(m.init_from)
        except ValueError as exc:
            problems.append(str(exc))
    need(o.backbone_lr > 0, "optim.backbone_lr must be > 0")
    need(isinstance(o.warmup_epochs, int) and o.warmup_epochs >= 0, "optim.warmup_epochs must be an int >= 0")
    need(0 < o.decay_rate <= 1, "optim.decay_rate must be in (0, 1]")
    need(o.decay_epochs > 0, "optim.decay_epochs must be > 0")
    need(
        cfg.trainer.scheduler == "none" and cfg.trainer.warmup_epochs == 0,
        "trainer.scheduler must be 'none' and trainer.warmup_epochs 0: the slots family schedules its "
        "learning rate with optim.warmup_epochs / decay_rate / decay_epochs",
    )
    need(ls.featrec_weight >= 0 and ls.contrastive_weight >= 0, "loss.slots weights must be >= 0")
    need(ls.temperature > 0, "loss.slots.temperature must be > 0")
    need(d.kind in DATA_KINDS, f"data.kind must be one of {list(DATA_KINDS)}")
    if positive_int("data.ep_length"):
        need(d.ep_length >= 2, "data.ep_length must be >= 2 (the contrastive loss pairs frame t with t+1)")
    positive_int("data.batch_size")
    if d.kind == "frame_folder":
        root = d.get("root")
        need(root is not None and Path(str(root)).is_dir(), f"data.root={root!r}: no such directory")
    if not problems:  # every param_groups pattern must select something; built on the meta device: free
        try:
            patterns = _pattern_list(cfg)
            for pattern, _ in patterns:
                re.compile(pattern)
        except (re.error, ValueError, TypeError) as exc:
            problems.append(f"optim.param_groups: entries must be {{pattern: <regex>, lr: <float>}} ({exc})")
        else:
            with torch.device("meta"):
                model = build_model(cfg)
            names = [n for n, p in model.named_parameters() if p.requires_grad]
            for i, (pattern, lr) in enumerate(patterns):
                need(lr > 0, f"optim.param_groups[{i}].lr must be > 0")
                need(
                    any(re.fullmatch(pattern, n) for n in names),
                    f"optim.param_groups[{i}].pattern={pattern!r} matches no trainable parameter "
                    f"(strategy {o.strategy}; names look like {names[:3]} ...)",
                )
    if problems:
        raise ValueError("; ".join(problems))


# ---------------------------------------------------------------- task


@dataclass
class Batch:
    names: list[str]
    frames: torch.Tensor  # (B, T, 3, S, S) in [0, 1], S = backbone img_size
    masks: torch.Tensor | None  # (B, T, H, W) int64 at the data's resolution


def init_from_checkpoint(model: torch.nn.Module, path: Path) -> dict[str, Any]:
    """Load the entries of a stage-1 checkpoint that fit `model` (strict=False); returns what was done."""
    state = load_checkpoint(path)["model"]
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(fitting, strict=False)
    report = {
        "path": str(path),
        "initialised": len(fitting),
        "not_initialised": sorted(set(own) - set(fitting)),
        "ignored": sorted(set(state) - set(fitting)),
    }
    log.info(
        "initialised %d tensors from %s; not initialised: %s; ignored from the checkpoint: %s",
        report["initialised"],
        path,
        report["not_initialised"],
        report["ignored"],
    )
    return report


class SlotsTask(Task):
    """Data, model, losses and segmentation metrics of one slots-family run."""

    best_checkpoints: ClassVar[dict[str, str]] = {"best": "val/total_loss"}

    def __init__(self, cfg: DictConfig, run_dir: Path, device: torch.device) -> None:
        self.cfg, self.device, self.run_dir = cfg, device, Path(run_dir)
        self.splits = self._load_splits(load_object_videos(cfg.data))
        if not self.splits["train"] or not self.splits["val"]:
            raise DataError(
                f"data: train and val splits need clips, got {self.describe()}; add videos or change "
                "data.split_fractions"
            )
        self.model = build_model(cfg)
        if cfg.model.backbone.checkpoint is not None:
            load_vit_checkpoint(self.model.backbone, cfg.model.backbone.checkpoint)
        self.init_report = (
            init_from_checkpoint(self.model, resolve_init_from(cfg.model.init_from))
            if cfg.model.init_from is not None
            else None
        )
        self.model.to(device)
        self.with_masks = has_masks(cfg)

    def _load_splits(self, videos: list[ObjectVideo]) -> dict[str, list[ObjectVideo]]:
        """The shared rule (`resolve_splits`): the run dir's own splits.json (resume, eval), else derived by
        source recording; one task 'objects' whose handles are the clip names."""
        d = self.cfg.data

        def by_recording() -> Splits:
            parts = split_videos(videos, tuple(d.split_fractions), d.split_seed)
            return {split: {"objects": [v.name for v in part]} for split, part in parts.items()}

        handles = [Handle(name=v.name, task="objects") for v in videos]
        splits = resolve_splits(
            handles, self.run_dir, fractions=d.split_fractions, seed=d.split_seed, derive=by_recording
        )
        self.split_handles = splits
        by_name = {v.name: v for v in videos}
        return {s: [by_name[h.name] for h in select(handles, splits, s)] for s in SPLIT_NAMES}

    # ------------------------------------------------------------------ optimiser hooks for the loop
    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser param groups: trainer.lr, optim.backbone_lr and optim.param_groups (first match wins)."""
        return build_param_groups(
            self.model, float(self.cfg.trainer.lr), float(self.cfg.optim.backbone_lr), _pattern_list(self.cfg)
        )

    def lr_factor(self, epoch: int) -> float:
        """Multiplier of every group's lr in `epoch`: linear warmup, then exponential decay
        (`decay_rate` every `decay_epochs` epochs after warmup)."""
        o = self.cfg.optim
        if epoch < o.warmup_epochs:
            return (epoch + 1) / (o.warmup_epochs + 1)
        return float(o.decay_rate ** ((epoch - o.warmup_epochs) / o.decay_epochs))

    # ------------------------------------------------------------------ batches
    def make_batch(self, videos: Sequence[ObjectVideo]) -> Batch:
        frames, masks = batch_videos(videos)  # (B, T, 3, H, W), (B, T, H, W)
        size = self.cfg.model.backbone.img_size
        if frames.shape[-2:] != (size, size):
            b, t = frames.shape[:2]
            frames = F.interpolate(
                frames.flatten(0, 1), size=(size, size), mode="bilinear", antialias=True, align_corners=False
            ).unflatten(0, (b, t))
        return Batch(
            [v.name for v in videos],
            frames.clamp(0, 1).to(self.device),
            None if masks is None else masks.to(self.device),
        )

    def _chunks(self, videos: list[ObjectVideo], order: Sequence[int]) -> Iterator[Batch]:
        bs = self.cfg.data.batch_size
        for i in range(0, len(order), bs):
            yield self.make_batch([videos[j] for j in order[i : i + bs]])

    def train_batches(self, epoch: int, generator: torch.Generator) -> Iterator[Batch]:
        # drawn now, before the first batch: a resumed half epoch rebuilds the same order
        order = torch.randperm(len(self.splits["train"]), generator=generator).tolist()
        return self._chunks(self.splits["train"], order)

    def val_batches(self) -> Iterator[Batch]:
        return self._chunks(self.splits["val"], range(len(self.splits["val"])))

    # ------------------------------------------------------------------ losses
    def losses(self, batch: Batch, epoch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        ls = self.cfg.loss.slots
        out = self.model(batch.frames, generator)
        featrec = feature_reconstruction_loss(out["reconstruction"], out["features"])
        contrast = slot_contrastive_loss(out["slots"], ls.temperature, ls.batch_contrast)
        total = ls.featrec_weight * featrec + ls.contrastive_weight * contrast
        return {"total_loss": total, "featrec_loss": featrec, "contrastive_loss": contrast}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def predict(self, videos: list[ObjectVideo]) -> Iterator[tuple[Batch, torch.Tensor]]:
        """(batch, masks (B, T, K, N) of `model.eval_masks`) in order; sampled slot inits use a fixed
        generator."""
        self.model.eval()
        generator = torch.Generator().manual_seed(self.cfg.seed + 2)
        key = f"{self.cfg.model.eval_masks}_masks"
        for batch in self._chunks(videos, range(len(videos))):
            yield batch, self.model(batch.frames, generator)[key]

    def segmentation_metrics(
        self, split: str, baselines: bool = False, plot: Path | None = None
    ) -> dict[str, float]:
        """Mean FG-ARI / VideoARI / mBO / Hungarian mIoU over the split's clips (mBO and mIoU skip clips
        without objects); with `baselines`, the same for random-blob and grid masks of as many segments
        as slots; with `plot`, the slot masks of the first clips drawn there."""
        scores: dict[str, list[torch.Tensor]] = {}
        generator = torch.Generator().manual_seed(self.cfg.seed + 3)
        predictions = {"": None}
        for i, (batch, masks) in enumerate(self.predict(self.splits[split])):
            true = batch.masks  # (B, T, H, W)
            size = tuple(true.shape[-2:])
            predictions[""] = masks_to_labels(patch_grid(masks), size)
            if baselines:
                for name in BASELINES:
                    predictions[f"_{name}"] = random_mask_baseline(
                        true, self.model.num_slots, generator, kind=_BASELINE_KIND[name]
                    )
            for suffix, pred in predictions.items():
                scores.setdefault(f"fg_ari{suffix}", []).append(video_ari(true, pred, foreground_only=True))
                scores.setdefault(f"video_ari{suffix}", []).append(video_ari(true, pred))
                scores.setdefault(f"mbo{suffix}", []).append(mbo(true, pred))
                scores.setdefault(f"miou{suffix}", []).append(hungarian_miou(true, pred))
            if plot is not None and i == 0:
                plot_slot_masks(
                    batch.frames.cpu(),
                    upsample_masks(masks, tuple(batch.frames.shape[-2:])).cpu(),
                    true.cpu(),
                    plot,
                    title=f"{self.cfg.experiment_name}: {split} slot masks",
                )
        return {k: float(torch.cat(v).nanmean()) for k, v in scores.items()}

    def _vis_path(self, name: str) -> Path:
        return self.run_dir / "plots" / f"slots_{name}.png"

    def evaluate(self, split: str, epoch: int) -> dict[str, float]:
        if not self.with_masks:
            return {}
        every = self.cfg.logger.get("vis_every") or 0
        plot = self._vis_path(f"epoch{epoch:03d}") if every and (epoch + 1) % every == 0 else None
        return self.segmentation_metrics(split, plot=plot)

    def evaluate_checkpoint(self, run_dir: Path, checkpoint: str) -> dict[str, float]:
        """Val and test segmentation metrics of the loaded weights with the random and grid baselines next
        to them, and the test clips' slot masks in plots/slots_<checkpoint>.png."""
        if not self.with_masks:
            return {}
        metrics: dict[str, float] = {}
        for split in ("val", "test"):
            if not self.splits[split]:
                continue
            plot = self._vis_path(checkpoint) if split == "test" else None
            result = self.segmentation_metrics(split, baselines=True, plot=plot)
            metrics.update({f"{split}/{k}": v for k, v in result.items()})
        return metrics

    def after_fit(self, history: list[dict[str, float]], run_dir: Path) -> None:
        plot_slots_history(history, Path(run_dir) / "plots" / "slots_history.png")

    def save(self, run_dir: Path) -> None:
        save_splits(self.split_handles, Path(run_dir) / "splits.json")
        if self.init_report is not None:
            atomic_write_json(Path(run_dir) / "init_from.json", self.init_report)

    def describe(self) -> dict[str, Any]:
        return {split: len(v) for split, v in self.splits.items()}


Task = SlotsTask
