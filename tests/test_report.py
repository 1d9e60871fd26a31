"""`ablate report`: one self-contained HTML file (and Markdown with PNGs beside it) of a sweep with the
demo's shape, driven through the study API; headless chromium renders it with the network off, and a
two-axis sweep gets its ranking and critical-difference diagram."""

import base64
import io
import json
import re
import shutil

import numpy as np
import pytest
from optuna.trial import TrialState
from PIL import Image

from analysis.report import report_command
from core.provenance import provenance
from core.train.run import environment
from launchers.cli import main
from sweepstate.study import SweepStudy
from tests.browser import dump_dom, screenshot
from tests.test_analysis import build_grid_sweep, spec_of, write_run

# set by the copy of the report that chromium checks: is every image decoded and laid out?
PROBE = (
    "<script>window.addEventListener('load', () => document.body.setAttribute('data-images', "
    "Array.from(document.images).map(i => i.complete && i.naturalWidth > 0 && i.offsetHeight > 0).join()))"
    "</script>"
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo sweep's report (HTML) through the CLI; (root, report path)."""
    root = tmp_path_factory.mktemp("report")
    study = build_grid_sweep(root, "demo")
    env = environment(provenance("demo", [])[0])  # what core/train/run.py records with every run
    for summary in (study.sweep_dir / "trials").glob("*/summary.json"):
        summary.write_text(json.dumps({**json.loads(summary.read_text()), "environment": env}))
    assert main(["report", "demo", "--root", str(root)]) == 0
    return root, root / "sweeps" / "demo" / "report" / "report.html"


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float64)


def test_html_report_is_one_self_contained_file(demo):
    root, path = demo
    text = path.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", text)  # nothing loaded from anywhere
    assert "<script" not in text and "http://" not in text and "https://" not in text
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)"', text)
    figures = sorted((root / "sweeps" / "demo" / "report" / "figures").glob("*.png"))
    assert len(images) == len(figures) == 2  # bars of the objective per method, learning curves
    for data in images:
        pixels = _png(base64.b64decode(data))
        assert pixels.shape[0] > 200 and pixels.std() > 5  # a real figure, not an empty canvas
    headings = re.findall(r"<h2>([^<]+)</h2>", text)
    assert headings == [
        "Question",
        "Results: final/val/ogpe_action",
        "Plots and learning curves",
        "Failures",
        "Trials",
        "Wall time and GPU-hours",
        "Code and versions",
    ]
    env = environment(provenance("demo", [])[0])
    assert f"optuna {env['packages']['optuna']}" in text and f"torch {env['packages']['torch']}" in text
    if env["git_commit"]:
        assert env["git_commit"] in text and env["git_commit"][:10] in text
    assert text.count("RuntimeError: boom") >= 6 and "P(better than none)" in text
    assert "loss/progress=none" in text  # what a trial ran: its overrides


def test_chromium_renders_the_report_offline_with_its_table_and_every_plot(demo, tmp_path):
    _, path = demo
    probe = tmp_path / "probe.html"
    probe.write_text(path.read_text().replace("</body>", PROBE + "</body>"))
    dom, errors = dump_dom(probe.as_uri(), tmp_path, budget_ms=5000, offline=True)
    assert errors == []
    flags = re.search(r'data-images="([^"]*)"', dom).group(1).split(",")
    assert flags == ["true"] * 2
    assert dom.count("<table") >= 4 and "(baseline)" in dom
    shot = tmp_path / "shot.png"
    assert screenshot(path.as_uri(), shot, offline=True) == []  # the report itself, untouched
    pixels = _png(shot.read_bytes())
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.01  # text and figures, not a blank page


def test_markdown_report_has_its_pngs_beside_it(demo, tmp_path):
    root, _ = demo
    out = tmp_path / "md" / "demo.md"
    path = report_command("demo", root, "md", str(out), "iqm")
    text = path.read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(linked) == 2 and all((out.parent / name).is_file() for name in linked)
    assert "(IQM ± 95% CI)" in text and "| c " in text


def test_report_of_an_unknown_sweep_or_format_is_a_usage_error(demo, capsys):
    root, _ = demo
    assert main(["report", "nope", "--root", str(root)]) == 2
    assert "no sweep here" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown format"):
        report_command("demo", root, "pdf")


def test_a_two_axis_sweep_is_ranked_with_a_critical_difference_diagram(tmp_path):
    methods = {"p": 0.0, "q": 0.02, "r": 0.3}
    tasks = {"u": 0.0, "v": 1.0}
    grid = (
        ("method", tuple((m, (f"loss.progress.k={i}",)) for i, m in enumerate(methods))),
        ("task", tuple((t, (f"trainer.epochs={i + 2}",)) for i, t in enumerate(tasks))),
    )
    study = SweepStudy.create(spec_of("multi", seeds=(0, 1, 2, 3), grid=grid), tmp_path)
    rng = np.random.default_rng(0)
    while (claim := study.claim("w")) is not None:
        value = methods[claim.params["method"]] + tasks[claim.params["task"]] + rng.normal(0, 0.02)
        write_run(claim.run_dir, value, claim.seed)
        study.finish(claim, TrialState.COMPLETE, value)
    path = report_command("multi", tmp_path, "html")
    text = path.read_text()
    assert "ranking of method by final/val/ogpe_action over 8 blocks" in text
    assert "critical-difference diagram of method" in text and "ranking of task" not in text  # 2 tasks
    # bars by (method, task), by method and by task; learning curves; the diagram
    assert len(re.findall(r'<img src="data:image/png', text)) == 5
    assert "by method (baseline: p)" in text and "stratified within each task task" in text
    shutil.rmtree(tmp_path / "sweeps" / "multi" / "report")  # figures are redrawn on demand
    assert report_command("multi", tmp_path, "md").is_file()


def test_a_search_sweeps_report_lists_its_best_trials_importances_and_a_rerun(tmp_path):
    from tests.test_analysis import build_search_sweep

    build_search_sweep(tmp_path, n_complete=6)
    text = report_command("srch", tmp_path, "md").read_text()
    assert "top 5 of 6 complete trials by final/val/ogpe_action" in text
    assert "parameter importances (" in text and "save as sweeps/srch_top5.yaml" in text
    assert text.count("```") == 4  # the sweep file and the re-run sweep, each fenced once
    assert "optimisation history" in text


def test_a_sweep_whose_first_group_has_no_result_yet_is_reported_against_the_first_that_has(tmp_path):
    study = SweepStudy.create(spec_of("firstless", seeds=(0, 1)), tmp_path)
    while (claim := study.claim("w")) is not None:
        if claim.params["method"] == "none":  # the sweep file's first value: every run failed
            study.finish(claim, TrialState.FAIL, reason="RuntimeError: out of memory")
            continue
        write_run(claim.run_dir, 0.3 + 0.01 * claim.number, claim.seed)
        study.finish(claim, TrialState.COMPLETE, 0.3)
    text = report_command("firstless", tmp_path, "md").read_text()
    assert "by method (baseline: a)" in text and "P(better than a)" in text
    assert text.count("RuntimeError: out of memory") == 2
    assert "‡: fewer than 5 runs: a Student-t interval" in text  # 2 seeds per group


def test_report_masks_the_storage_password_of_the_sweep_file_and_of_sweep_json(tmp_path):
    """A report is mailed: the sweep's question block never carries a database password, whether it
    shows the sweep file as written or the spec saved in sweep.json."""
    from analysis.report import question

    url = "postgresql+psycopg://ablate:S3cr@t-pw@db.example:5432/ablate"
    sweep_file = tmp_path / "pg.yaml"
    sweep_file.write_text(f"# does A help?\nexperiment: progress_none\nstorage: {url}\n")
    (tmp_path / "sweep.json").write_text(json.dumps({"name": "pg", "storage": url}))
    for blocks in (question(str(sweep_file), tmp_path), question(str(tmp_path / "gone.yaml"), tmp_path)):
        shown = "\n".join(b.text for b in blocks)
        assert "S3cr" not in shown and "ablate:***@db.example:5432/ablate" in shown, shown
