"""Run report: plots of a real short run and of a damaged metrics file, and the page with them."""

import json
import os
import re

import numpy as np
import pytest
import tiny
from matplotlib import image as mpimg

from simclr_jax import modes
from simclr_jax.outputs import report


def tiny_config(**overrides):
    """The shared tiny digits run, 8 steps, logging every 2."""
    c = tiny.tiny_config(total_steps=8, log_every_steps=2, checkpoint_every_steps=8, **overrides)
    # The end-of-run evaluation (evaluate.py's job, tested there) would double this file's time;
    # test_eval_table checks the table from an eval.json of the digits run.
    c.eval.at_end = False
    return c


def check_page(out_dir, index):
    """Every PNG in the report is a non-empty PLOT_SIZE image and the page references each."""
    assert index == os.path.join(out_dir, "index.html")
    page = open(index).read()
    pngs = sorted(f for f in os.listdir(out_dir) if f.endswith(".png"))
    assert pngs
    for name in pngs:
        img = mpimg.imread(os.path.join(out_dir, name))
        if name != "augment.png":  # the preview grid (preview.py) has its own size
            assert img.shape[:2] == (report.PLOT_SIZE[1], report.PLOT_SIZE[0]), (name, img.shape)
        assert float(np.std(img[..., :3])) > 0.01, name  # something is drawn, not a blank canvas
        assert f'src="{name}"' in page, name
    assert set(re.findall(r'src="([^"]+)"', page)) == set(pngs)  # no dangling references
    return pngs, page


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    modes.pretrain(tiny_config(), workdir)
    return workdir


def test_report_of_a_real_short_run(short_run):
    out = os.path.join(short_run, "report")
    pngs, page = check_page(out, report.write_report(short_run))
    for name in ("loss", "contrastive_acc", "lr", "linear_acc", "images_per_sec"):
        assert f"{name}.png" in pngs, name
    assert "Not logged" not in page
    assert "<td>model.depth</td><td>18</td>" in page
    # Reports are rewritten in place (e.g. by a cron job during the run): same files again.
    assert check_page(out, report.write_report(short_run))[0] == pngs
    assert "step 8 of 8 (100%)" in page


def test_report_of_a_run_in_progress(short_run, tmp_path):
    """Only config.json and a few metrics rows (no eval.json, no checkpoint): still a report."""
    workdir = str(tmp_path / "partial")
    os.makedirs(workdir)
    for name in ("config.json", "metrics.jsonl"):
        text = open(os.path.join(short_run, name)).read()
        if name == "metrics.jsonl":
            text = "".join(text.splitlines(keepends=True)[:2])
        open(os.path.join(workdir, name), "w").write(text)
    # A preview written earlier by --mode=preview_augment joins the page.
    os.makedirs(os.path.join(workdir, "report"))
    grid = np.random.default_rng(0).uniform(size=(20, 30, 3))
    mpimg.imsave(os.path.join(workdir, "report", "augment.png"), grid)
    pngs, page = check_page(os.path.join(workdir, "report"), report.write_report(workdir))
    assert "eval.png" not in pngs and "augment.png" in pngs
    assert "No eval.json yet" in page
    assert "step 4 of 8 (50%)" in page


def test_damaged_metrics_missing_keys_and_torn_last_line(tmp_path):
    workdir = tmp_path / "hand"
    workdir.mkdir()
    rows = [
        {"step": 10, "loss": 5.0, "lr": 0.1, "epoch": 0.5, "rankme": 12.0},
        {"step": 20, "loss": 4.5, "contrastive_acc": 0.2, "epoch": 1.0, "align": 9.0},
        {"step": 30, "loss": "nan", "lr": 0.3, "align": 0.8, "uniform": -1.5, "epoch": 1.5},
        {"step": 20, "loss": 4.4, "contrastive_acc": 0.25, "epoch": 1.0},  # resumed: wins
        {"step": 40, "loss": 4.0, "my_new_metric": 3.0, "epoch": 2.0},
    ]
    lines = [json.dumps(r) for r in rows]
    text = "\n".join(lines) + "\n" + '{"step": 50, "loss": 3.9, "l'  # torn mid-write
    (workdir / "metrics.jsonl").write_text(text)
    (workdir / "config.json").write_text(json.dumps({"total_steps": 100, "model": {"depth": 50}}))
    (workdir / "eval.json").write_text("{not json")  # unreadable: left out, not fatal

    assert [r["step"] for r in report.read_metrics(str(workdir / "metrics.jsonl"))] == [
        10,
        20,
        30,
        40,
    ]
    pngs, page = check_page(str(workdir / "report"), report.write_report(str(workdir)))
    expected = {"loss", "lr", "contrastive_acc", "align", "uniform", "rankme", "my_new_metric"}
    assert {p[:-4] for p in pngs} == expected
    assert "Not logged (yet): linear_acc, images_per_sec." in page
    rows = report.read_metrics(str(workdir / "metrics.jsonl"))
    assert rows[1] == {"step": 20, "loss": 4.4, "contrastive_acc": 0.25, "epoch": 1.0}
    assert np.isnan(rows[2]["loss"])
    assert "step 40 of 100 (40%)" in page
    assert report.steps_per_epoch(report.read_metrics(str(workdir / "metrics.jsonl")), {}) == 20


def test_eval_table(tmp_path):
    ev = {
        "linear": {"random_init": 0.9667, "pretrained": 0.9833},
        "knn": {"random_init": 0.8306, "pretrained": 0.9278},
    }
    (tmp_path / "eval.json").write_text(json.dumps(ev))
    pngs, page = check_page(str(tmp_path / "report"), report.write_report(str(tmp_path)))
    assert pngs == ["eval.png"]
    assert "<tr><td>linear</td><td>0.9667</td><td>0.9833</td></tr>" in page
    assert "<tr><td>knn</td><td>0.8306</td><td>0.9278</td></tr>" in page


def test_report_mode(tmp_path):

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 6.0}\n')
    index = modes.run("report", tiny_config(), str(tmp_path), False)
    assert index == str(tmp_path / "report" / "index.html")
    assert os.path.exists(tmp_path / "report" / "loss.png")


def test_empty_workdir_gives_a_page_not_an_error(tmp_path):
    index = report.write_report(str(tmp_path))
    page = open(index).read()
    assert "no metrics logged yet" in page
    assert not [f for f in os.listdir(tmp_path / "report") if f.endswith(".png")]
