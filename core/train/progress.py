"""The progress family: GTCC-family alignment plus an optional progress loss, as a loop `Task`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig, OmegaConf

from core.atomic import atomic_write_json
from core.data.errors import DataError
from core.data.features import load_feature_dataset
from core.data.splits import resolve_splits, save_splits, select
from core.data.synthetic import make_procedure_dataset
from core.data.video import Video
from core.losses.alignment import gtcc_loss, lav_loss, tcc_loss, vava_loss
from core.losses.pairs import pad_sequences
from core.losses.progress import cumulative_l2_progress_loss, learnable_progress_loss
from core.metrics.progress_eval import METRIC_NAMES, ProgressEvaluator
from core.models.encoder import MultiHeadModel, TemporalStacking
from core.models.progress_head import HEAD_KINDS, ProgressHead
from core.train.loop import Task
from core.train.plots import plot_calibration, plot_dual_losses, plot_progress_curves

ALIGNMENT_LOSSES = {"tcc": tcc_loss, "gtcc": gtcc_loss, "lav": lav_loss, "vava": vava_loss}
PROGRESS_METHODS = ("none", "cumulative_l2", "learnable")


def check_config(cfg: DictConfig) -> None:
    """Reject a config that cannot train before anything is written; ValueError names the key."""
    problems = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            problems.append(msg)

    need(
        cfg.loss.alignment.name in ALIGNMENT_LOSSES,
        f"loss.alignment.name must be one of {sorted(ALIGNMENT_LOSSES)}",
    )
    p = cfg.loss.progress
    need(p.method in PROGRESS_METHODS, f"loss.progress.method must be one of {list(PROGRESS_METHODS)}")
    need(p["lambda"] >= 0, "loss.progress.lambda must be >= 0")
    need(p.curriculum.start >= 0 and p.curriculum.end >= 0, "loss.progress.curriculum start/end must be >= 0")
    if p.method == "learnable":
        need(isinstance(p.k, int) and p.k >= 1, "loss.progress.k must be an integer >= 1")
        need(
            isinstance(p.min_segment_len, int) and p.min_segment_len >= 1,
            "loss.progress.min_segment_len must be an integer >= 1",
        )
        need(p.start in ("random", "action_start"), "loss.progress.start must be 'random' or 'action_start'")
        need(p.loss in ("l1", "l2"), "loss.progress.loss must be 'l1' or 'l2'")
        need(p.head.type in HEAD_KINDS, f"loss.progress.head.type must be one of {list(HEAD_KINDS)}")
        need(
            p.head.type != "transformer" or p.head.hidden_dim % p.head.heads == 0,
            "loss.progress.head.hidden_dim must be divisible by loss.progress.head.heads",
        )
    need(cfg.data.kind in ("synthetic", "features"), "data.kind must be 'synthetic' or 'features'")
    need(
        isinstance(cfg.data.batch_size, int) and cfg.data.batch_size >= 2,
        "data.batch_size must be an integer >= 2 (alignment needs pairs)",
    )
    if cfg.data.kind == "features":
        root = cfg.data.get("root")
        need(root is not None and Path(str(root)).is_dir(), f"data.root={root!r} is not a directory")
    if problems:
        raise ValueError("; ".join(problems))


EVAL_METRICS = METRIC_NAMES  # OGPE, baselines, early/mid/end progress, monotonicity


def logged_metrics(cfg: DictConfig) -> set[str]:
    """Every metric name a run of `cfg` logs, so a sweep can reject an objective that never appears."""
    losses = ["total_loss", "alignment_loss"]
    if cfg.loss.progress.method != "none":
        losses += ["progress_loss", "progress_lambda"]
    names = {f"{split}/{k}" for split in ("train", "val") for k in losses}
    names |= {f"{split}/{k}" for split in ("val", "test") for k in EVAL_METRICS}
    return names


def load_videos(data_cfg: DictConfig) -> list[Video]:
    """The dataset named by the `data` config group."""
    if data_cfg.kind == "synthetic":
        return make_procedure_dataset(**OmegaConf.to_container(data_cfg.generator, resolve=True))
    if data_cfg.kind == "features":
        return load_feature_dataset(
            data_cfg.root,
            dataset_json=data_cfg.dataset_json,
            features_dir=data_cfg.features_dir,
            annotation_fps=data_cfg.annotation_fps,
            feature_fps=data_cfg.feature_fps,
        )
    raise ValueError(f"data.kind must be 'synthetic' or 'features', got {data_cfg.kind!r}")


def progress_lambda(cfg: DictConfig, epoch: int, epochs: int) -> float:
    """Fixed lambda, or the seeds' linear curriculum from `start` (epoch 0) to `end` (last epoch)."""
    cur = cfg.curriculum
    if cur.enabled:
        return float(cur.start + (cur.end - cur.start) * epoch / max(epochs - 1, 1))
    return float(cfg["lambda"])


@dataclass
class Batch:
    videos: list[Video]
    x: torch.Tensor  # (B, T_max, D_in)
    mask: torch.Tensor  # (B, T_max)


class ProgressModel(torch.nn.Module):
    """Encoder plus the optional learnable progress head (so both live in one state dict)."""

    def __init__(self, encoder: MultiHeadModel, head: ProgressHead | None) -> None:
        super().__init__()
        self.encoder = encoder
        self.progress_head = head

    def embed(self, batch: Batch) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        out = self.encoder(batch.x, batch.mask)
        lengths = batch.mask.sum(1).tolist()
        seqs = [e[:n] for e, n in zip(out["embeddings"], lengths, strict=True)]  # list of (T_i, D)
        drops = list(out["dropouts"]) if "dropouts" in out else None
        return seqs, drops


def build_model(cfg: DictConfig, input_dim: int, num_tasks: int) -> ProgressModel:
    m = cfg.model
    base = TemporalStacking(
        input_dim, m.base.hidden_dim, m.base.output_dim, m.base.n_layers, m.base.kernel_size
    )
    encoder = MultiHeadModel(
        base,
        m.num_heads or num_tasks,
        head_layers=tuple(m.head_layers),
        attn_layers=tuple(m.attn_layers),
        drop_layers=tuple(m.drop_layers),
        drop_context=cfg.loss.alignment.name == "gtcc",
    )
    p = cfg.loss.progress
    head = None
    if p.method == "learnable":
        head = ProgressHead(
            base.output_dim,
            p.head.hidden_dim,
            position_encoding=p.fixes.position_encoding,
            learnable_h0=p.fixes.learnable_h0,
            delta_output=p.fixes.delta_targets,
            # run dirs saved before head.type existed say use_gru
            kind=p.head.get("type", "gru" if p.head.get("use_gru", True) else "mean"),
            n_layers=p.head.get("layers"),
            n_heads=p.head.get("heads", 4),
            ff_dim=p.head.get("ff_dim"),
            kernel_size=p.head.get("kernel_size", 3),
        )
    return ProgressModel(encoder, head)


class ProgressTask(Task):
    """Data, model and losses of one progress-family run."""

    # the seeds' dual checkpoints: best total (alignment + progress) and best alignment alone
    best_checkpoints: ClassVar[dict[str, str]] = {
        "combined": "val/total_loss",
        "alignment": "val/alignment_loss",
    }

    def __init__(self, cfg: DictConfig, run_dir: Path, device: torch.device) -> None:
        if cfg.loss.alignment.name not in ALIGNMENT_LOSSES:
            raise ValueError(f"loss.alignment.name must be one of {sorted(ALIGNMENT_LOSSES)}")
        if cfg.loss.progress.method not in PROGRESS_METHODS:
            raise ValueError(f"loss.progress.method must be one of {PROGRESS_METHODS}")
        self.cfg, self.device = cfg, device
        videos = load_videos(cfg.data)
        d = cfg.data
        self.splits = resolve_splits(
            videos,
            run_dir,
            fractions=d.split_fractions,
            seed=d.split_seed,
            dataset_file=Path(d.root) / d.splits_file if d.get("splits_file") else None,
        )
        self.videos = {s: select(videos, self.splits, s) for s in ("train", "val", "test")}
        self.tasks = sorted({v.task for v in videos})
        for split in ("train", "val"):
            counts = Counter(v.task for v in self.videos[split])
            if not any(n >= 2 for n in counts.values()):
                raise DataError(
                    f"the {split} split has fewer than 2 videos in every task ({dict(counts)}): alignment "
                    "losses need pairs of videos of one task; add videos or change data.split_fractions"
                )
        self.model = build_model(cfg, videos[0].features.shape[1], len(self.tasks)).to(device)
        self.evaluator = ProgressEvaluator(self, self.videos["train"])

    # ------------------------------------------------------------------ batches
    def make_batch(self, videos: list[Video]) -> Batch:
        feats = [torch.as_tensor(v.features, dtype=torch.float32) for v in videos]
        x, mask, _ = pad_sequences(feats)
        return Batch(videos, x.to(self.device), mask.to(self.device))

    def _batches(self, videos: list[Video], generator: torch.Generator | None) -> Iterator[Batch]:
        """Single-task batches of `data.batch_size` (a leftover single video joins the previous batch)."""
        bs = self.cfg.data.batch_size
        groups: list[list[Video]] = []
        for task in self.tasks:
            vids = [v for v in videos if v.task == task]
            if generator is not None:
                vids = [vids[i] for i in torch.randperm(len(vids), generator=generator).tolist()]
            chunks = [vids[i : i + bs] for i in range(0, len(vids), bs)]
            if len(chunks) > 1 and len(chunks[-1]) < 2:
                chunks[-2].extend(chunks.pop())
            groups.extend(c for c in chunks if len(c) >= 2)
        order = (
            torch.randperm(len(groups), generator=generator).tolist()
            if generator is not None
            else range(len(groups))
        )
        for i in order:
            yield self.make_batch(groups[i])

    def train_batches(self, epoch: int, generator: torch.Generator) -> Iterator[Batch]:
        return self._batches(self.videos["train"], generator)

    def val_batches(self) -> Iterator[Batch]:
        return self._batches(self.videos["val"], None)

    # ------------------------------------------------------------------ losses
    def alignment_loss(
        self,
        seqs: list[torch.Tensor],
        drops: list[torch.Tensor] | None,
        epoch: int,
        generator: torch.Generator,
    ) -> torch.Tensor:
        a = self.cfg.loss.alignment
        params = dict(a.params)
        if a.name == "gtcc":
            return gtcc_loss(seqs, drops, epoch=epoch, generator=generator, **params)
        if a.name == "vava":
            return vava_loss(seqs, epoch=epoch, **params)
        return ALIGNMENT_LOSSES[a.name](seqs, **params)

    def progress_loss(
        self, seqs: list[torch.Tensor], batch: Batch, generator: torch.Generator
    ) -> torch.Tensor:
        p = self.cfg.loss.progress
        times = [v.times for v in batch.videos]
        if p.method == "cumulative_l2":
            return cumulative_l2_progress_loss(seqs, times, generator=generator)
        return learnable_progress_loss(
            self.model.progress_head,
            seqs,
            times,
            k=p.k,
            min_segment_len=p.min_segment_len,
            start=p.start,
            loss=p.loss,
            delta_targets=p.fixes.delta_targets,
            inverse_weighting=p.fixes.inverse_weighting,
            generator=generator,
        )

    def losses(self, batch: Batch, epoch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        seqs, drops = self.model.embed(batch)
        align = self.alignment_loss(seqs, drops, epoch, generator)
        out = {"alignment_loss": align}
        if self.cfg.loss.progress.method == "none":
            out["total_loss"] = align
            return out
        lam = progress_lambda(self.cfg.loss.progress, epoch, self.cfg.trainer.epochs)
        prog = self.progress_loss(seqs, batch, generator)
        out.update(progress_loss=prog, total_loss=align + lam * prog, progress_lambda=torch.tensor(lam))
        return out

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def embed_videos(self, videos: list[Video]) -> list[torch.Tensor]:
        self.model.eval()
        out: list[torch.Tensor] = []
        for i in range(0, len(videos), 8):
            seqs, _ = self.model.embed(self.make_batch(videos[i : i + 8]))
            out.extend(s.cpu() for s in seqs)
        return out

    def evaluate(self, split: str, epoch: int) -> dict[str, float]:
        return self.evaluator.evaluate(self.videos[split]).metrics

    def evaluate_checkpoint(self, run_dir: Path, checkpoint: str) -> dict[str, float]:
        """Val and test metrics of the loaded weights, online as at deployment, plus their plots."""
        metrics: dict[str, float] = {}
        for split in ("val", "test"):
            result = self.evaluator.evaluate(self.videos[split], curves=6 if split == "test" else 0)
            metrics.update({f"{split}/{k}": v for k, v in result.metrics.items()})
        plot_progress_curves(
            result.curves,
            run_dir / "plots" / f"progress_{checkpoint}.png",
            title=f"{self.cfg.experiment_name}: predicted vs true progress ({checkpoint})",
        )
        # the test split's predictions binned over relative position: where the early-frame failure shows
        atomic_write_json(run_dir / "eval" / f"calibration_{checkpoint}.json", result.calibration)
        plot_calibration(
            result.calibration,
            run_dir / "plots" / f"calibration_{checkpoint}.png",
            title=f"{self.cfg.experiment_name}: calibration over relative position ({checkpoint})",
        )
        return metrics

    def after_fit(self, history: list[dict[str, float]], run_dir: Path) -> None:
        plot_dual_losses(history, run_dir / "plots" / "dual_loss_comparison.png")

    def save(self, run_dir: Path) -> None:
        save_splits(self.splits, run_dir / "splits.json")

    def describe(self) -> dict[str, Any]:
        # which video-level progress ground truth `ogpe` was scored against (the release's, by default)
        return {
            **{split: len(v) for split, v in self.videos.items()},
            "video_progress_gt": self.evaluator.video_gt,
        }


Task = ProgressTask
