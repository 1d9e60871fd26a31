"""Data-parallel training: 2 CPU processes (gloo) equal 1 process at the same global batch.

The two ranks are launched as torchrun or SLURM would (RANK / WORLD_SIZE / MASTER_* in the environment) on
`ablate run --run-dir`; the video family's loss is a mean over pairs, so averaged shard gradients equal the
whole batch's gradient and both runs must log the same losses and end with the same weights."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml

from launchers.cli import main
from tests.test_slurm import cluster  # noqa: F401 (the fixture)
from tests.test_video_family import TINY

ARGS = ["run", "video_two_stream", *TINY, "trainer.num_threads=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_gloo_ranks_train_like_one_process_at_the_same_global_batch(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main([*ARGS, "--run-dir", str(single)]) == 0

    port = str(_free_port())
    code = "import sys; from launchers.cli import main; sys.exit(main(sys.argv[1:]))"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, *ARGS, "--run-dir", str(ddp)],
            env={
                **os.environ,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs

    a, b = _rows(single), _rows(ddp)
    assert len(a) == len(b) == 2
    for key in ("train/total_loss", "val/total_loss"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-4), key
    assert b[-1]["val/psnr"] == pytest.approx(a[-1]["val/psnr"], rel=1e-4)
    wa = torch.load(single / "checkpoints" / "last.pt", weights_only=False)["model"]
    wb = torch.load(ddp / "checkpoints" / "last.pt", weights_only=False)["model"]
    # Adam divides by the gradient's own scale: parameters whose gradient is ~0 (attention key biases)
    # turn float reduction-order noise into steps of up to ~lr: 1.4e-5 of the weights' norm measured, while
    # training moved them much further (without gradient averaging the logged losses already differ)
    flat_a = torch.cat([v.float().flatten() for v in wa.values()])
    flat_b = torch.cat([wb[k].float().flatten() for k in wa])
    assert float((flat_b - flat_a).norm() / flat_a.norm()) < 1e-4
    assert float((flat_b - flat_a).abs().max()) < 0.5 * 2e-3  # half of one step at trainer.lr
    # only rank 0 wrote the run directory and printed its summary
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["eval"]["checkpoint"] == "best"
    assert str(ddp) in outputs[0].splitlines() and str(ddp) not in outputs[1].splitlines()


@pytest.mark.slow
@pytest.mark.usefixtures("cluster")
def test_a_slurm_worker_with_two_tasks_trains_its_trial_data_parallel(tmp_path):
    """launcher.slurm.tasks_per_node=2: rank 0 claims and records the trial, both tasks train it (gloo),
    and the result equals one process training the same config."""
    from omegaconf import OmegaConf

    from core.train.run import run_experiment
    from launchers.sweeps import slurm
    from launchers.sweeps.spec import load_sweep
    from sweepstate.study import SweepStudy

    sweep = {
        "experiment": "video_two_stream",
        "overrides": [*TINY, "trainer.num_threads=1"],
        "objective": {"metric": "val/total_loss", "direction": "minimize"},
        "seeds": [0],
        "grid": {"model.decoder.variant": ["D"]},
        "workers": 1,
        "lease": {"heartbeat_s": 1, "timeout_s": 60, "max_retries": 0},
        "launcher": {
            "name": "slurm",
            "slurm": {"time": "00:10:00", "cpus_per_task": 1, "tasks_per_node": 2, "mem": "4G"},
        },
    }
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(sweep))
    study = SweepStudy.create(load_sweep(path), tmp_path / "runs")
    (job,) = slurm.submit_slurm_workers(study.sweep_dir, 1, slurm.slurm_resources(study.spec.launcher))
    assert job.results() == [1, 1]  # trials each rank trained
    (trial,) = study.trials()
    assert trial.state == "COMPLETE"
    summary = json.loads((trial.run_dir / "summary.json").read_text())
    assert summary["environment"]["ranks"] == 2 and summary["status"] == "completed"
    logs = "".join(p.read_text() for p in (study.sweep_dir / "workers").glob("*_log.err"))
    assert "rank 1: rank 0 has no more trials; trained 1" in logs

    single = tmp_path / "single"
    run_experiment(OmegaConf.load(trial.run_dir / "config.yaml"), single)
    a, b = _rows(single), _rows(trial.run_dir)
    for key in ("train/total_loss", "val/total_loss"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-4), key
