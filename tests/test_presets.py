"""Presets as data: every built-in preset passes the checks, a YAML preset file extends one and overrides settings per
section, bad keys and values fail at load naming the key and what is allowed, and a run on a file preset reaches the
processes it starts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ldm_paper import presets
from ldm_paper.presets import PRESETS, get_preset, load_preset_file, validate_preset

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _clean_registry(monkeypatch):
    monkeypatch.setattr(presets, "USER_PRESETS", {})
    monkeypatch.setenv(presets.PRESET_FILES_ENV, "")      # load_preset_file adds to it; restored (unset) afterwards


def test_every_built_in_preset_passes_the_checks():
    for name in PRESETS: validate_preset(get_preset(name))


def test_a_preset_file_extends_a_built_in_one_section_by_section(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("name: mine\nextends: cpu\nwidths: [16, 32]\ntrain: {steps: 20, micro_batch: 16}\n"
                 "eval: {cfg_scales: [1.0, 3.0]}\n")
    assert load_preset_file(f) == "mine"
    p = get_preset("mine")
    assert p["widths"] == (16, 32) and p["eval"]["cfg_scales"] == (1.0, 3.0)           # sequences as tuples
    assert p["train"]["steps"] == 20 and p["train"]["micro_batch"] == 16
    assert p["train"]["batch_size"] == PRESETS["cpu"]["train"]["batch_size"]            # the rest of the section kept
    assert p["eval"]["n_samples"] == PRESETS["cpu"]["eval"]["n_samples"] and p["extends"] == "cpu"
    assert str(f.resolve()) in os.environ[presets.PRESET_FILES_ENV]


@pytest.mark.parametrize("text,message", [
    ("name: b\nextends: ci\ntrian: {steps: 1}\n", "unknown key 'trian'; allowed: ['scale', 'widths', 'data'"),
    ("name: b\nextends: ci\ntrain: {stesp: 1}\n", "unknown key train.stesp; allowed: ['batch_size'"),
    ("name: b\nextends: ci\ntrain: {steps: ten}\n", "train.steps='ten' must be a number"),
    ("name: b\nextends: ci\ntrain: {steps: 0}\n", "steps must be a positive int, got 0"),
    ("name: b\nextends: ci\ndata: {dataset: imagenet}\n", "data.dataset='imagenet' is not allowed; choose one of ['fashion-mnist', 'folder', 'coco', 'webdataset']"),
    ("name: b\nextends: ci\neval: {samplers: [euler]}\n", "eval.samplers='euler' is not allowed"),
    ("name: b\nextends: ci\nwidths: [20]\n", "widths=[20]: choose from the cpu family [16, 24, 32, 48, 64]"),
    ("name: b\nextends: ci\ntrain: {mixed_precision: fp8}\n", "mixed_precision='fp8' is not allowed; choose one of ['no', 'bf16']"),
    ("name: b\nextends: ci\neval: {compile: yes please}\n", "eval.compile='yes please' must be True or False"),
    ("name: b\nextends: ci\ntrain: {compile: 1}\n", "compile must be True or False, got 1"),
    ("name: b\nextends: ci\nplan: {gpus: 8}\n", "unknown key plan.gpus; allowed: ['device_gb', 'devices'"),
    ("name: cpu\nextends: ci\n", "name='cpu' is a built-in preset"),
    ("name: b\nextends: laptop\n", "extends='laptop' is not allowed; choose one of ['ci', 'cpu', 'gpu', 'paper', 'coco256', 'paper-smoke']"),
    ("extends: ci\n", "name must be given"),
])
def test_bad_preset_files_fail_at_load_naming_the_key(tmp_path, text, message):
    f = tmp_path / "bad.yaml"; f.write_text(text)
    with pytest.raises(ValueError) as e: load_preset_file(f)
    assert message in str(e.value)
    assert "b" not in presets.USER_PRESETS


def test_a_run_on_a_preset_file_reaches_the_notebooks_it_runs(tmp_path):
    f = tmp_path / "mine.yaml"; f.write_text("name: mine_ci\nextends: ci\nwidths: [16]\n")   # *_ci files are not committed
    out = ROOT / "figures" / "data" / "shards_mine_ci.json"
    r = subprocess.run([str(BIN / "ldm-paper"), "--preset-file", str(f), "reproduce", "--only", "encode", "--runs-dir",
                        str(tmp_path / "runs")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "plan for preset 'mine_ci'" in r.stdout and "encode  ran" in r.stdout.replace("   ", "  ")
    assert json.loads(out.read_text())["preset"] == "mine_ci"       # written by the papermill kernel, which found the preset
    out.unlink()
    bad = subprocess.run([str(BIN / "ldm-paper"), "reproduce", "--preset", "mine_ci", "--dry-run"], capture_output=True, text=True)
    assert bad.returncode == 2 and "preset='mine_ci' is not allowed" in bad.stderr   # without the file, no such preset


def test_a_preset_resolves_into_one_typed_object():
    p = get_preset("ci")
    assert isinstance(p, presets.Preset) and str(p) == "ci" and f"fig09_{p}.png" == "fig09_ci.png"
    assert p["train"] is p.train and p.widths == (16, 24) and p.get("plan") is None and "plan" not in p
    assert "plan" in get_preset("paper") and get_preset("paper").plan["devices"] == 8
    with pytest.raises(KeyError, match="preset 'ci' has no 'plan'"): p["plan"]
    with pytest.raises(AttributeError): p.widths = (16,)                       # frozen: a change is a new preset
    with pytest.raises(TypeError, match="resolved already"): get_preset(p)
    assert presets.as_preset(p) is p and presets.as_preset("ci").name == "ci"
    import pickle
    assert pickle.loads(pickle.dumps(p)).to_dict() == p.to_dict()              # what a worker process receives
    assert get_preset("ci", widths=(16,)).widths == (16,)
    with pytest.raises(ValueError, match=r"widths=\[20\]: choose from the cpu family"): get_preset("ci", widths=(20,))


def test_a_preset_object_is_passed_down_without_a_lookup(monkeypatch):
    from ldm_paper.experiment import train_config, prepare_data, train_workers
    from ldm_paper.autoencoder import preset_dir
    from ldm_paper.metrics import eval_net_meta
    p, looked_up, real = get_preset("ci"), [], presets.get_preset
    monkeypatch.setattr(presets, "get_preset", lambda name, **kw: looked_up.append(name) or real(name, **kw))
    train_config(p, 16); train_workers(p); preset_dir(p); eval_net_meta(p, "b"); prepare_data(p, progress=False)
    assert looked_up == []
    train_config("ci", 24)                               # by name: looked up once, at the call
    assert looked_up == ["ci"]


def test_a_job_notebook_takes_a_preset_file_as_a_papermill_parameter(tmp_path):
    import papermill as pm
    f = tmp_path / "mine.yaml"; f.write_text("name: pm_ci\nextends: ci\nwidths: [16]\n")
    out = ROOT / "figures" / "data" / "shards_pm_ci.json"
    assert os.environ[presets.PRESET_FILES_ENV] == ""          # the kernel can find the preset only through the parameter
    pm.execute_notebook(str(ROOT / "nbs" / "80_encode.ipynb"), str(tmp_path / "out.ipynb"), parameters=dict(preset_file=str(f)),
                        kernel_name="python3", cwd=str(ROOT), progress_bar=False)
    assert json.loads(out.read_text())["preset"] == "pm_ci"
    out.unlink()
