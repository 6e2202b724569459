import re
import shutil
from pathlib import Path

import pytest

from ldm_paper.experiment import class_prompts, train_config
from ldm_paper.presets import PRESETS, get_preset



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


def test_bad_width_and_preset_fail_clearly(capsys):
    from ldm_paper.cli import main
    with pytest.raises(ValueError, match="width=20 is not trained at preset 'cpu'"):
        train_config("cpu", 20)
    with pytest.raises(ValueError, match="preset='laptop'"):
        get_preset("laptop")
    with pytest.raises(SystemExit) as exit_:                         # the console script's path, in this process
        main(["train", "--preset", "ci", "--widths", "20"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "ldm-paper train: error: width=20" in err and "Traceback" not in err


def test_class_prompts_order():
    assert class_prompts(2, classes=[0, 9]) == ["a photo of a t-shirt"] * 2 + ["a photo of an ankle boot"] * 2


def test_cli_train_writes_tidy_log_and_curves(tmp_path):
    from ldm_paper.cli import main
    assert main(["train", "--preset", "ci", "--quiet", "--summary", str(tmp_path)]) == 0   # in this process
    import pandas as pd
    logs = pd.read_csv(tmp_path / "data" / "train_log_ci.csv")
    assert set(logs.width) == {16, 24} and {"loss", "train_compute", "samples_per_s"} <= set(logs.columns)
    assert logs.groupby("width").step.max().tolist() == [PRESETS["ci"]["train"]["steps"]] * 2
    # compute grows with width at equal steps: the bigger model's last point lies to the right
    last = logs.groupby("width").train_compute.max()
    assert last[24] > last[16]
    assert (tmp_path / "train_loss_ci.png").stat().st_size > 10_000


def test_paper_preset_reads_a_local_folder_vae_and_clip(tmp_path, monkeypatch, capsys):
    """The `paper` preset's data path end to end on small models the test makes itself: a captioned image folder,
    an SD-shaped VAE (f = 8, 4 latent channels) and a CLIP text encoder, all from local paths given by environment
    variables; the latents have the paper scale's 64x64x4 shape and each caption maps to its own CLIP embedding."""
    import numpy as np, torch
    from PIL import Image
    from diffusers import AutoencoderKL
    from ldm_paper.autoencoder import ae_config
    from ldm_paper.experiment import prepare_data, text_encoder
    from ldm_paper.family import get_scale
    from ldm_paper.text import save_tiny_clip
    monkeypatch.setenv("LDM_PAPER_CACHE", str(tmp_path / "cache"))
    for v in ("LDM_PAPER_DATA", "LDM_PAPER_VAE", "LDM_PAPER_CLIP_TEXT"): monkeypatch.delenv(v, raising=False)
    with pytest.raises(FileNotFoundError, match="data.root .*LDM_PAPER_DATA"):
        prepare_data("paper")                                   # fails before any model is touched
    folder = tmp_path / "images"; folder.mkdir()
    captions = ["a red bag", "a blue shirt", "a red shirt"]
    rng = np.random.default_rng(0)
    for i, c in enumerate(captions):
        Image.fromarray(rng.integers(0, 255, (600, 700, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "captions.csv").write_text("file,caption\n" + "".join(f"{i}.png,{c}\n" for i, c in enumerate(captions)))
    AutoencoderKL(**ae_config(image_channels=3, block_out_channels=(8, 8, 8, 8), image_size=512)).save_pretrained(tmp_path / "vae")
    save_tiny_clip(tmp_path / "clip", captions=captions)
    monkeypatch.setenv("LDM_PAPER_DATA", str(folder))
    monkeypatch.setenv("LDM_PAPER_VAE", str(tmp_path / "vae"))
    with pytest.raises(FileNotFoundError, match="text.pretrained .*LDM_PAPER_CLIP_TEXT"):
        prepare_data("paper")
    monkeypatch.setenv("LDM_PAPER_CLIP_TEXT", str(tmp_path / "clip"))
    import accelerate
    class TwoProcesses:                                         # under a launch, a rank must not encode behind a barrier
        num_processes = 2
    with monkeypatch.context() as m:
        m.setattr(accelerate, "PartialState", TwoProcesses)
        with pytest.raises(FileNotFoundError, match="not encoded yet: run .*ldm-paper encode --preset paper"):
            prepare_data("paper")
    data = prepare_data("paper", progress=False)                # one process: encodes its latent shards, then reads them
    s = get_scale("paper")
    assert tuple(data.latents.shape) == (3, s.latent_channels, s.latent_size, s.latent_size) == (3, 4, 64, 64)
    assert data.latents.captions([0, 1, 2]) == [[c] for c in captions]
    enc = text_encoder("paper")
    for c in captions + [""]:                                   # captions are CLIP-encoded in the step, on the device
        assert torch.allclose(data.text.encode([c], "cpu")[0], enc.encode([c])[0], atol=1e-5)
    assert prepare_data("paper", progress=False).fingerprint == data.fingerprint   # the second call reads the shards
    from ldm_paper.cli import main
    assert main(["encode", "--preset", "paper", "--quiet"]) == 0                # the job: already done, says where
    assert main(["encode", "--preset", "ci", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"latent shards of paper \(train\): .*shards.* \(3 images\)", out), out
    assert "preset 'ci' keeps Fashion-MNIST's latents in memory: nothing to encode" in out


def test_train_family_in_two_workers_matches_one_process(tmp_path, monkeypatch):
    """`train.workers = 2` trains the widths in two spawned processes (1 thread each) and gives the same run folders,
    with the same weights up to float rounding of the thread count, as training them here one after another."""
    import torch
    from safetensors.torch import load_file
    from ldm_paper import presets
    from ldm_paper.experiment import train_family, train_workers
    weights = {}
    monkeypatch.setenv("LDM_PAPER_CACHE", str(tmp_path / "cache"))   # one cache: the autoencoder and latents made once
    for workers in (2, 1):
        shutil.rmtree(tmp_path / "cache" / "train", ignore_errors=True)        # the runs themselves trained afresh each time
        monkeypatch.setitem(presets.PRESETS["ci"]["train"], "workers", workers)
        assert train_workers("ci") == workers
        runs = train_family("ci", progress=False)
        assert all((Path(r) / "done.json").exists() for r in runs.values())
        weights[workers] = {c: load_file(Path(r) / "unet_ema" / "diffusion_pytorch_model.safetensors") for c, r in runs.items()}
        names = {c: Path(r).name for c, r in runs.items()}
        if workers == 2: names2 = names
    assert names == names2                          # the worker count is not part of a run's identity
    for c in weights[1]:
        for k, v in weights[1][c].items():
            torch.testing.assert_close(weights[2][c][k], v, rtol=1e-3, atol=1e-4)
    monkeypatch.setitem(presets.PRESETS["ci"]["train"], "workers", 0)
    with pytest.raises(ValueError, match="train.workers must be a positive int"):
        train_workers("ci")


def test_a_width_the_plan_gives_fsdp_needs_an_fsdp_launch():
    from ldm_paper.experiment import train_family
    p = get_preset("paper", widths=(512, 768))      # the plan: 512 DDP with checkpointing, 768 FSDP (data never read)
    with pytest.raises(ValueError, match=r"widths \[768\] of preset 'paper' need FSDP .*--widths 768 --fsdp"):
        train_family(p, progress=False)
