"""The video family: the two-stream video predictor trained on (img_t, img_t+k) pairs, as a loop `Task`.

Training minimises the per-pair MSE of the predicted img_tk, weighted by exp(-weight_decay (k - 1)) as in
the original. Reconstruction can be solved by a shortcut, so evaluation also measures the encoder
directly: a linear probe of the frozen fused CLS (and of the P-stream CLS) predicting the action of the
pair, and nearest-neighbour retrieval of pairs with the same action, next to the reconstruction MSE/PSNR
per gap and a copy-the-current-frame baseline. The probe is fit on fixed training-split pairs and tested
on fixed held-out pairs that are the same for every seed and variant, so runs compare pair by pair.

Mixed precision: with `amp: bf16` on CUDA the forward pass runs under bf16 autocast (the shared loop's
backward needs no scaler for bf16); the loss and every metric are computed in float32.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from core.data.clips import PairSample, sample_pairs
from core.data.errors import DataError
from core.data.frames import pair_labels
from core.data.loader import PairBatches, default_num_workers, pair_loader
from core.data.sources import check_data_config, num_action_classes, open_frames
from core.data.splits import SPLIT_NAMES, Splits, resolve_splits, save_splits, select
from core.metrics.representation import (
    linear_probe_accuracy,
    majority_accuracy,
    per_pair_mse,
    reconstruction_metrics,
    retrieval_score,
)
from core.models.two_stream import TwoStreamVideoPredictor, build_two_stream, encoder_problems
from core.models.video_decoder import decoder_problems
from core.train.distributed import SINGLE, DistContext, context_from_env
from core.train.loop import Task
from core.train.video_plots import plot_predictions, plot_training_curves

AMP_MODES = ("none", "bf16")
GAP_NAMES = ("k1", "kmid", "kmax")
_RECON = ("mse", "psnr", *(f"{m}_{g}" for g in GAP_NAMES for m in ("mse", "psnr")))
EVAL_METRICS = (
    *_RECON,
    *(f"copy_{m}" for m in _RECON),
    "probe_acc_fused",
    "probe_acc_p",
    "probe_chance",
    "retrieval",
)


def named_gaps(k_max: int) -> dict[str, int]:
    """The gaps reported separately: the shortest, the middle one and the longest."""
    return dict(zip(GAP_NAMES, (1, (1 + k_max) // 2, k_max), strict=True))


def check_config(cfg: DictConfig) -> None:
    """Reject a config that cannot train before anything is written; ValueError names the key."""
    problems = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            problems.append(msg)

    try:
        check_data_config(cfg.data)
    except ValueError as exc:
        problems.append(str(exc))
    d, m, e = cfg.data, cfg.model, cfg.eval
    need(d.get("pairs") is not None, "data.pairs must set k_max, gap_decay and weight_decay")
    for key in ("batch_size", "pairs_per_epoch"):
        need(isinstance(d.get(key), int) and d[key] >= 1, f"data.{key} must be an integer >= 1")
    need(m.image_size == d.image_size, f"model.image_size={m.image_size} differs from data.image_size")
    sizes = {k: m[k] for k in ("image_size", "patch_size", "width", "depth", "heads", "num_stages")}
    if all(isinstance(v, int) for v in sizes.values()):
        problems += [f"model: {p}" for p in encoder_problems(**sizes)]
        problems += [f"model.decoder: {p}" for p in decoder_problems(m.decoder.variant, m.patch_size)]
    else:
        problems.append(f"model sizes must be integers, got {sizes}")
    loader = cfg.get("loader") or {}
    workers = loader.get("num_workers")
    need(
        workers is None or (isinstance(workers, int) and workers >= 0),
        "loader.num_workers must be null or an integer >= 0",
    )
    need(
        isinstance(loader.get("prefetch_factor", 2), int) and loader.get("prefetch_factor", 2) >= 1,
        "loader.prefetch_factor must be an integer >= 1",
    )
    need(cfg.get("amp") in AMP_MODES, f"amp must be one of {list(AMP_MODES)}, got {cfg.get('amp')!r}")
    for key in ("pairs", "probe_pairs", "probe_max_iter", "retrieval_k", "batch_size"):
        need(isinstance(e.get(key), int) and e[key] >= 1, f"eval.{key} must be an integer >= 1")
    need(e.probe_l2 > 0, "eval.probe_l2 must be > 0 (the probe's objective must be strictly convex)")
    need(e.gap_decay >= 0, "eval.gap_decay must be >= 0")
    need(
        isinstance(e.plot_examples, int) and e.plot_examples >= 0,
        "eval.plot_examples must be an integer >= 0",
    )
    if problems:
        raise ValueError("; ".join(problems))


def logged_metrics(cfg: DictConfig) -> set[str]:
    """Every metric name a run of `cfg` logs, so a sweep can reject an objective that never appears."""
    names = {"train/total_loss", "val/total_loss"}
    return names | {f"{split}/{k}" for split in ("val", "test") for k in EVAL_METRICS}


def build_model(model_cfg: DictConfig) -> TwoStreamVideoPredictor:
    return build_two_stream(**OmegaConf.to_container(model_cfg, resolve=True))


@dataclass
class PairBatch:
    img_t: torch.Tensor  # (B, 3, H, W) in [0, 1]
    img_tk: torch.Tensor  # (B, 3, H, W), the prediction target
    k: torch.Tensor  # (B,) gaps
    weight: torch.Tensor  # (B,) loss weights


def _take(sample: PairSample, index: slice | torch.Tensor) -> PairSample:
    return PairSample(*(x[index] for x in sample))


def _fixed_generator(split_seed: int, purpose: str) -> torch.Generator:
    """Evaluation pairs depend on the data split seed only: every seed and variant sees the same pairs."""
    return torch.Generator().manual_seed(zlib.crc32(f"{split_seed}/{purpose}".encode()))


class VideoTask(Task):
    """Data, model, loss and evaluation of one video-family run.

    Only the clip index is held in memory; frames are read per batch by the input pipeline
    (`core.data.loader`: `loader.num_workers` worker processes, default the task's CPUs minus one)."""

    def __init__(self, cfg: DictConfig, run_dir: Path, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.store = open_frames(cfg.data)
        d = cfg.data
        self.splits: Splits = resolve_splits(
            self.store.clips, run_dir, fractions=d.split_fractions, seed=d.split_seed
        )
        index = {(c.task, c.name): i for i, c in enumerate(self.store.clips)}
        self.videos = {  # split -> indices of its clips in the store
            s: [index[c.task, c.name] for c in select(self.store.clips, self.splits, s)] for s in SPLIT_NAMES
        }
        self.clips = {s: [self.store.clips[i] for i in v] for s, v in self.videos.items()}
        for split, part in self.clips.items():
            if not any(c.num_frames >= 2 for c in part):
                raise DataError(
                    f"the {split} split has no clip of 2 or more frames ({len(part)} clips): add videos or "
                    "change data.split_fractions"
                )
        self.lengths = {s: [c.num_frames for c in part] for s, part in self.clips.items()}
        p, e = cfg.data.pairs, cfg.eval
        self.k_max, self.gaps = p.k_max, named_gaps(p.k_max)
        # fixed pairs: the probe's training set (train split) and the held-out evaluation pairs
        self.samples = {
            split: sample_pairs(
                self.lengths[split],
                e.probe_pairs if split == "train" else e.pairs,
                p.k_max,
                gap_decay=e.gap_decay,
                weight_decay=p.weight_decay,
                generator=_fixed_generator(cfg.data.split_seed, f"eval/{split}"),
            )
            for split in SPLIT_NAMES
        }
        self.labels = {s: pair_labels(self.clips[s], sample) for s, sample in self.samples.items()}
        self.num_classes = num_action_classes(cfg.data)
        self.amp = cfg.amp == "bf16" and device.type == "cuda"
        loader = cfg.get("loader") or {}
        workers = loader.get("num_workers")
        self.num_workers = default_num_workers() if workers is None else workers
        self.prefetch_factor = loader.get("prefetch_factor", 2)
        self.shard = context_from_env()  # a data-parallel rank reads only its rows of each batch
        self.model = build_model(cfg.model).to(device)

    # ------------------------------------------------------------------ batches
    def _batches(
        self, split: str, sample: PairSample, batch_size: int, start: int = 0, shard: DistContext = SINGLE
    ) -> Iterator[PairBatch]:
        """Batches `start`.. of `sample`'s pairs, read ahead by the loader's workers; floats on the device."""
        batches = PairBatches(
            self.store, self.videos[split], sample, batch_size, shard.rank, shard.world_size
        )
        cuda = self.device.type == "cuda"
        items = pair_loader(
            batches,
            start=start,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor,
            pin_memory=cuda,
        )
        for item in items:
            yield PairBatch(
                item.img_t.to(self.device, non_blocking=cuda).float().div_(255.0),
                item.img_tk.to(self.device, non_blocking=cuda).float().div_(255.0),
                item.k.to(self.device),
                item.weight.to(self.device),
            )

    def train_batches(self, epoch: int, generator: torch.Generator) -> Iterator[PairBatch]:
        return self.train_batches_from(epoch, generator, 0)

    def train_batches_from(self, epoch: int, generator: torch.Generator, start: int) -> Iterator[PairBatch]:
        """`data.pairs_per_epoch` fresh pairs, all drawn before the first batch (exact mid-epoch resume);
        a resumed epoch skips its done batches without reading them. This rank's rows only."""
        p = self.cfg.data.pairs
        sample = sample_pairs(
            self.lengths["train"],
            self.cfg.data.pairs_per_epoch,
            p.k_max,
            gap_decay=p.gap_decay,
            weight_decay=p.weight_decay,
            generator=generator,
        )
        n_batches = -(-len(sample.t) // self.cfg.data.batch_size)
        if start > n_batches:
            raise ValueError(f"the epoch has {n_batches} batches, fewer than {start}")
        return self._batches("train", sample, self.cfg.data.batch_size, start, self.shard)

    def shard_batch(self, batch: PairBatch, rank: int, world_size: int) -> PairBatch:
        """The batch as read: the loader of each rank already read only its equal share of every global
        batch (`PairBatches.rows`). The loss is a mean over pairs, so the mean of the shards' gradients
        is the global batch's gradient."""
        if (rank, world_size) != (self.shard.rank, self.shard.world_size):
            raise ValueError(f"batches were read for rank {self.shard.rank} of {self.shard.world_size}")
        return batch

    def val_batches(self) -> Iterator[PairBatch]:
        return self._batches("val", self.samples["val"], self.cfg.eval.batch_size)

    # ------------------------------------------------------------------ loss
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def losses(self, batch: PairBatch, epoch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        with self._autocast():
            pred = self.model(batch.img_t, batch.img_tk)["pred"]
        # (B,), in the target's precision (float32 under bf16 autocast)
        mse = per_pair_mse(pred.to(batch.img_tk.dtype), batch.img_tk)
        return {"total_loss": (batch.weight * mse).mean()}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def _outputs(self, split: str, decode: bool) -> dict[str, torch.Tensor]:
        """Per-pair CLS embeddings (and, with `decode`, MSEs) of a split's fixed pairs, on the CPU."""
        self.model.eval()
        rows: dict[str, list[torch.Tensor]] = {"cls": [], "p_cls": [], "mse": [], "copy_mse": []}
        for batch in self._batches(split, self.samples[split], self.cfg.eval.batch_size):
            with self._autocast():
                out = (
                    self.model(batch.img_t, batch.img_tk)
                    if decode
                    else self.model.encoder(batch.img_t, batch.img_tk)
                )
            rows["cls"].append(out["cls"].float().cpu())
            rows["p_cls"].append(out["p_cls"].float().cpu())
            if decode:
                rows["mse"].append(per_pair_mse(out["pred"].to(batch.img_tk.dtype), batch.img_tk).cpu())
                rows["copy_mse"].append(per_pair_mse(batch.img_t, batch.img_tk).cpu())
        return {k: torch.cat(v) for k, v in rows.items() if v}

    def _metrics(self, split: str, train: dict[str, torch.Tensor]) -> dict[str, float]:
        """Reconstruction (model and copy baseline, per gap), probes and retrieval on a held-out split."""
        out = self._outputs(split, decode=True)
        gaps, y, train_y = self.samples[split].k, self.labels[split], self.labels["train"]
        e = self.cfg.eval
        metrics = reconstruction_metrics(out["mse"], gaps, self.gaps)
        metrics |= reconstruction_metrics(out["copy_mse"], gaps, self.gaps, prefix="copy_")
        for key, name in (("cls", "probe_acc_fused"), ("p_cls", "probe_acc_p")):
            metrics[name] = linear_probe_accuracy(
                train[key], train_y, out[key], y, self.num_classes, l2=e.probe_l2, max_iter=e.probe_max_iter
            )
        metrics["probe_chance"] = majority_accuracy(train_y, y)
        metrics["retrieval"] = retrieval_score(out["cls"], y, train["cls"], train_y, k=e.retrieval_k)
        return metrics

    def evaluate(self, split: str, epoch: int) -> dict[str, float]:
        return self._metrics(split, self._outputs("train", decode=False))

    def evaluate_checkpoint(self, run_dir: Path, checkpoint: str) -> dict[str, float]:
        """Val and test metrics of the loaded weights, and a plot of test predictions."""
        train = self._outputs("train", decode=False)
        metrics = {
            f"{split}/{k}": v for split in ("val", "test") for k, v in self._metrics(split, train).items()
        }
        if self.cfg.eval.plot_examples:
            self._plot_examples(Path(run_dir) / "plots" / f"predictions_{checkpoint}.png", checkpoint)
        return metrics

    @torch.no_grad()
    def _plot_examples(self, path: Path, checkpoint: str) -> None:
        """A few test pairs, spread over the named gaps: img_t, img_tk, prediction."""
        sample, n = self.samples["test"], self.cfg.eval.plot_examples
        per_gap = -(-n // len(self.gaps))
        picks = torch.cat(
            [(sample.k == k).nonzero().flatten()[:per_gap] for k in dict.fromkeys(self.gaps.values())]
        )
        batch = next(self._batches("test", _take(sample, picks[:n]), n))
        self.model.eval()
        with self._autocast():
            pred = self.model(batch.img_t, batch.img_tk)["pred"].float()
        variant = self.cfg.model.decoder.variant
        plot_predictions(
            batch.img_t.cpu(),
            batch.img_tk.cpu(),
            pred.cpu(),
            batch.k.cpu(),
            path,
            title=f"{self.cfg.experiment_name}: decoder {variant}, test pairs ({checkpoint})",
        )

    def after_fit(self, history: list[dict[str, float]], run_dir: Path) -> None:
        plot_training_curves(history, Path(run_dir) / "plots" / "training_curves.png")

    def save(self, run_dir: Path) -> None:
        save_splits(self.splits, Path(run_dir) / "splits.json")

    def describe(self) -> dict[str, Any]:
        return {
            **{split: len(part) for split, part in self.clips.items()},
            "probe_train_pairs": len(self.samples["train"].t),
            "eval_pairs": len(self.samples["val"].t),
        }


Task = VideoTask
