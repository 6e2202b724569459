import subprocess
import sys
from pathlib import Path

import pytest

from ldm_paper.experiment import class_prompts, train_config
from ldm_paper.presets import PRESETS, get_preset

BIN = Path(sys.executable).parent


def test_every_preset_is_complete():
    for name in PRESETS:
        p = get_preset(name)
        assert {"scale", "widths", "data", "autoencoder", "train"} <= set(p), name
        for c in p["widths"]:
            assert c in __import__("ldm_paper.family", fromlist=["SCALES"]).SCALES[p["scale"]].widths or name == "paper"


def test_train_config_milestones_are_compute():
    cfg = train_config("cpu", 32)
    assert cfg.steps == PRESETS["cpu"]["train"]["steps"]
    from ldm_paper.train import run_compute
    gf = run_compute(cfg)["forward_gflops"]
    assert cfg.milestones == pytest.approx(tuple(f * cfg.steps * gf for f in PRESETS["cpu"]["train"]["milestones_frac"]))


def test_bad_width_and_preset_fail_clearly():
    with pytest.raises(ValueError, match="width=20 is not trained at preset 'cpu'"):
        train_config("cpu", 20)
    with pytest.raises(ValueError, match="preset='laptop'"):
        get_preset("laptop")
    r = subprocess.run([str(BIN / "ldm-paper"), "train", "--preset", "ci", "--widths", "20"], capture_output=True, text=True)
    assert r.returncode == 2 and "ldm-paper train: error: width=20" in r.stderr and "Traceback" not in r.stderr


def test_class_prompts_order():
    assert class_prompts(2, classes=[0, 9]) == ["a photo of a t-shirt"] * 2 + ["a photo of an ankle boot"] * 2


def test_cli_train_writes_tidy_log_and_curves(tmp_path):
    r = subprocess.run([str(BIN / "ldm-paper"), "train", "--preset", "ci", "--quiet", "--summary", str(tmp_path)],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-2000:]
    import pandas as pd
    logs = pd.read_csv(tmp_path / "data" / "train_log_ci.csv")
    assert set(logs.width) == {16, 24} and {"loss", "train_compute", "samples_per_s"} <= set(logs.columns)
    assert logs.groupby("width").step.max().tolist() == [PRESETS["ci"]["train"]["steps"]] * 2
    # compute grows with width at equal steps: the bigger model's last point lies to the right
    last = logs.groupby("width").train_compute.max()
    assert last[24] > last[16]
    assert (tmp_path / "train_loss_ci.png").stat().st_size > 10_000
