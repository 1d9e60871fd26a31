"""The video family end to end: config checks, a run through run_experiment, exact resume, the probe check."""

import json
import os
import signal

import pytest
import torch

from core.data.clips import sample_pairs
from core.data.frames import pair_labels, read_pairs
from core.metrics.representation import linear_probe_accuracy, majority_accuracy
from core.train.families import logged_metrics
from core.train.loop import Interrupted
from core.train.run import build_task, run_experiment
from core.train.signals import stop_on_signals
from core.train.video import EVAL_METRICS, VideoTask
from launchers.config import ConfigError, compose_experiment
from tests.helpers import StopAfter
from tests.reference.representation import per_pair_mse_loop

# a run of a few seconds: 24 videos, 2 epochs of 64 pairs, small evaluation sets
TINY = [
    "logger.enabled=false",
    "data.generator.num_videos=24",
    "data.generator.frames=12",
    "data.split_fractions=[0.5,0.25,0.25]",
    "data.pairs_per_epoch=64",
    "data.batch_size=16",
    "data.pairs.k_max=4",
    "model.width=32",
    "model.decoder.dim=32",
    "model.decoder.skip_channels=8",
    "eval.pairs=64",
    "eval.probe_pairs=96",
    "eval.probe_max_iter=50",
    "eval.plot_examples=3",
    "trainer.epochs=2",
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    cfg = compose_experiment("video_two_stream", TINY)
    run_dir = tmp_path_factory.mktemp("runs") / "video"
    summary = run_experiment(cfg, run_dir)
    return cfg, run_dir, summary


def test_run_writes_checkpoints_plots_and_final_metrics(finished_run):
    _, run_dir, summary = finished_run
    assert summary["status"] == "completed" and summary["epochs_run"] == 2
    for name in ("best_model_best.pt", "last.pt"):
        assert (run_dir / "checkpoints" / name).is_file(), name
    for name in ("training_curves.png", "predictions_best.png"):
        assert (run_dir / "plots" / name).stat().st_size > 10_000, name
    ev = summary["eval"]
    for split in ("val", "test"):
        for gap in ("", "_k1", "_kmid", "_kmax"):
            assert 0 < ev[f"{split}/mse{gap}"] < 0.25 and ev[f"{split}/psnr{gap}"] > 6
            assert ev[f"{split}/copy_mse{gap}"] > 0
        for key in ("probe_acc_fused", "probe_acc_p", "probe_chance", "retrieval"):
            assert 0 <= ev[f"{split}/{key}"] <= 1
    assert summary["splits"]["train"] == 12 and summary["splits"]["eval_pairs"] == 64
    splits = json.loads((run_dir / "splits.json").read_text())
    assert sum(len(s) for s in splits["moving_objects"].values()) == 24


def _float_pairs(task, split, sample):
    """(img_t, img_tk) float (N, 3, S, S) in [0, 1], read straight from the task's frame store."""
    return (
        torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
        for x in read_pairs(task.store, task.videos[split], sample)
    )


def test_logged_metrics_names_exactly_what_the_run_logged(finished_run):
    cfg, run_dir, summary = finished_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = set(rows[-1]) | {k for k in summary["eval"] if "/" in k}
    assert logged == logged_metrics(cfg)
    assert {f"test/{k}" for k in EVAL_METRICS} <= logged


def test_copy_baseline_is_the_mse_of_predicting_img_t(finished_run):
    cfg, run_dir, summary = finished_run
    task = build_task(cfg, run_dir)  # same splits (read back from the run dir) and fixed pairs
    img_t, img_tk = _float_pairs(task, "test", task.samples["test"])
    expected = (img_t - img_tk).square().flatten(1).mean(1).mean()
    assert summary["eval"]["test/copy_mse"] == pytest.approx(float(expected), rel=1e-5)


def test_loss_is_the_gap_weighted_mean_of_per_pair_mse(finished_run):
    cfg, run_dir, _ = finished_run
    task = build_task(cfg, run_dir)
    batch = next(iter(task.val_batches()))
    batch.weight = batch.weight.double()
    task.model.double()
    batch.img_t, batch.img_tk = batch.img_t.double(), batch.img_tk.double()
    loss = task.losses(batch, 0, torch.Generator())["total_loss"]
    with torch.no_grad():
        pred = task.model(batch.img_t, batch.img_tk)["pred"]
    mse = per_pair_mse_loop(pred, batch.img_tk)
    expected = sum(float(w) * float(m) for w, m in zip(batch.weight, mse, strict=True)) / len(mse)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-10)
    torch.testing.assert_close(batch.weight, torch.exp(-0.7 * (batch.k.double() - 1)))


def _rows(run_dir):
    rows = (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rows]


def _same_weights(a_dir, b_dir):
    a = torch.load(a_dir / "checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(b_dir / "checkpoints/last.pt", weights_only=True)["model"]
    return all(torch.equal(a[k], b[k]) for k in a)


def test_killed_run_resumes_to_exactly_the_uninterrupted_run(finished_run, tmp_path):
    cfg, run_dir, summary = finished_run
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "cut", reporter=StopAfter(0))
    resumed = run_experiment(cfg, tmp_path / "cut")
    assert resumed["resumed_from_epoch"] == 1
    assert _rows(tmp_path / "cut") == _rows(run_dir)
    assert resumed["eval"] == summary["eval"]
    assert _same_weights(tmp_path / "cut", run_dir)


def test_stop_inside_an_epoch_resumes_bit_for_bit(finished_run, tmp_path):
    """train_batches draws the whole epoch before its first batch: the loop can rebuild a half-done epoch."""
    cfg, run_dir, _ = finished_run
    task = build_task(cfg, tmp_path / "cut")
    real, seen = task.losses, []

    def losses(batch, epoch, generator):  # SIGUSR2 (SLURM's warning) during the 2nd batch of epoch 1
        out = real(batch, epoch, generator)
        if task.model.training:
            seen.append(epoch)
            if seen.count(1) == 2:
                os.kill(os.getpid(), signal.SIGUSR2)
        return out

    task.losses = losses
    with stop_on_signals(), pytest.raises(Interrupted):
        run_experiment(cfg, tmp_path / "cut", task=task)
    run_experiment(cfg, tmp_path / "cut")
    assert _rows(tmp_path / "cut") == _rows(run_dir)
    assert _same_weights(tmp_path / "cut", run_dir)


@pytest.mark.parametrize(
    ("override", "culprit"),
    [
        ("model.decoder.variant=F", "decoder variant 'F'"),
        ("model.patch_size=6", "patch_size=6"),
        ("model.depth=4", "depth=4"),
        ("model.image_size=64", "model.image_size=64"),
        ("amp=fp16", "amp"),
        ("eval.probe_l2=0", "eval.probe_l2"),
        ("data.pairs_per_epoch=0", "data.pairs_per_epoch"),
        ("data.kind=nope", "data.kind"),
    ],
)
def test_bad_config_is_rejected_naming_the_key(override, culprit):
    with pytest.raises(ConfigError, match=culprit.replace("(", r"\(")):
        compose_experiment("video_two_stream", [*TINY, override])


def test_every_variant_composes_and_the_224px_experiment_is_the_original():
    for variant in "ABCDE":
        assert compose_experiment("video_two_stream", [f"model.decoder.variant={variant}"]).family == "video"
    cfg = compose_experiment("video_two_stream_224")
    assert (cfg.model.image_size, cfg.model.patch_size, cfg.model.width, cfg.model.depth) == (
        224,
        16,
        768,
        12,
    )
    assert (cfg.model.heads, cfg.model.num_stages, cfg.trainer.lr, cfg.trainer.optimizer) == (
        12,
        3,
        1e-4,
        "adamw",
    )


# ---------------------------------------------------------------- the probe measures something

# easy labels: 4 directions at one speed, k = 1 (every pair's motion is exactly its label's action)
EASY = [
    "logger.enabled=false",
    "data.generator.num_videos=60",
    "data.generator.directions=4",
    "data.generator.speeds=[0.08]",
    "data.generator.segment_len=[2,4]",
    "data.pairs.k_max=1",
    "eval.pairs=256",
    "eval.probe_pairs=512",
]


def _probe(task: VideoTask, shuffle: torch.Generator | None = None) -> float:
    train, val = task._outputs("train", decode=False), task._outputs("val", decode=False)
    y = task.labels["train"]
    if shuffle is not None:
        y = y[torch.randperm(len(y), generator=shuffle)]
    return linear_probe_accuracy(train["cls"], y, val["cls"], task.labels["val"])


@pytest.mark.slow
def test_probe_is_high_for_an_encoder_trained_on_the_actions_and_near_chance_without_signal(tmp_path):
    """A check of the metric, not of the method: an encoder trained (supervised) to read the action off the
    pair scores high on held-out videos; a randomly initialised one scores far lower (random features of the
    motion stream keep a little direction information: 0.46 here against a chance of 0.32), and the trained
    features with shuffled training labels score chance."""
    torch.manual_seed(0)
    task = VideoTask(compose_experiment("video_two_stream", EASY), tmp_path, torch.device("cpu"))
    chance = majority_accuracy(task.labels["train"], task.labels["val"])
    random_acc = _probe(task)
    head = torch.nn.Linear(task.model.encoder.vit.width, task.num_classes)
    opt = torch.optim.AdamW([*task.model.encoder.parameters(), *head.parameters()], lr=2e-3)
    g = torch.Generator().manual_seed(0)
    task.model.train()
    for _ in range(150):
        pairs = sample_pairs(task.lengths["train"], 32, 1, generator=g)
        img_t, img_tk = _float_pairs(task, "train", pairs)
        logits = head(task.model.encoder(img_t, img_tk)["cls"])
        loss = torch.nn.functional.cross_entropy(logits, pair_labels(task.clips["train"], pairs))
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained_acc = _probe(task)
    shuffled_acc = _probe(task, shuffle=torch.Generator().manual_seed(1))
    assert trained_acc > 0.9, (trained_acc, chance)
    assert random_acc < (chance + trained_acc) / 2, (random_acc, chance, trained_acc)
    assert abs(shuffled_acc - chance) < 0.12, (shuffled_acc, chance)
