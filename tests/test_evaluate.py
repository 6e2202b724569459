"""Evaluation store: cached rows, early errors, best-over-CFG, costs; evaluation split across processes and streamed."""
import json
import os
import subprocess
import textwrap
import time

import pytest

from ldm_paper.evaluate import evaluate, evaluate_grid, results_table, best_over_cfg, result_path, model_info
from ldm_paper.experiment import train_family


@pytest.fixture(scope="module")
def runs():
    return train_family("ci", progress=False)


def test_row_has_protocol_and_costs(runs):
    r = evaluate("ci", runs[16], 16, steps=2, cfg_scale=3.0, n_samples=20)
    for k in ("fid", "agreement", "n_samples", "n_reference", "feature_net", "sampler", "steps", "cfg_scale", "seed", "weights"):
        assert k in r
    assert r["sampling_cost"] == pytest.approx(model_info("cpu", 16)["norm_cost"] * 2)
    assert r["sampling_gflops"] == pytest.approx(model_info("cpu", 16)["gflops"] * 2 * 2)   # CFG doubles the passes
    assert result_path("ci", r["key"]).exists()


def test_cache_skips_finished_work(runs, monkeypatch):
    evaluate("ci", runs[16], 16, steps=2, cfg_scale=3.0, n_samples=20)
    import ldm_paper.evaluate as ev
    monkeypatch.setattr(ev, "sample", lambda *a, **k: pytest.fail("sampled again"))
    evaluate("ci", runs[16], 16, steps=2, cfg_scale=3.0, n_samples=20)     # would fail had it sampled again


def test_same_seed_same_fid_and_seed_matters(runs):
    a = evaluate("ci", runs[16], 16, steps=2, cfg_scale=1.0, n_samples=20, seed=0, force=True)
    b = evaluate("ci", runs[16], 16, steps=2, cfg_scale=1.0, n_samples=20, seed=0, force=True)
    c = evaluate("ci", runs[16], 16, steps=2, cfg_scale=1.0, n_samples=20, seed=1)
    assert a["fid"] == b["fid"] and a["fid"] != c["fid"]


@pytest.mark.parametrize("kw,msg", [(dict(sampler="euler"), "sampler='euler'"), (dict(steps=0), "steps must be"),
                                    (dict(steps=2.5), "steps must be"), (dict(cfg_scale=0.5), "cfg_scale must be"),
                                    (dict(n_samples=1), "n_samples must be")])
def test_bad_settings_fail_before_any_work(runs, kw, msg, monkeypatch):
    import ldm_paper.evaluate as ev
    monkeypatch.setattr(ev, "train_family", lambda *a, **k: pytest.fail("started work"))
    with pytest.raises(ValueError, match=msg.replace("(", r"\(")):
        evaluate_grid("ci", **_grid_kw(kw))


def _grid_kw(kw):
    out = {}
    for k, v in kw.items():
        out.update({"sampler": dict(samplers=(v,)), "steps": dict(steps=(v,)), "cfg_scale": dict(cfg_scales=(v,)),
                    "n_samples": dict(n_samples=v)}[k])
    return out


def test_best_over_cfg_picks_the_minimum(runs):
    df = evaluate_grid("ci", widths=(16,), steps=(2,), cfg_scales=(1.0, 3.0), n_samples=20, progress=False)
    best = best_over_cfg(df)
    assert len(best) == 1 and best.fid.iloc[0] == df.fid.min()
    assert len(results_table("ci")) >= 2


def test_evaluation_keys_of_different_models_differ(tmp_path):
    """Regression: SR runs of different widths once shared one cache row because a name with a '/' was cut to its
    last part. Every distinct model name or folder gets its own key; the same one always the same key."""
    from ldm_paper.evaluate import evaluation_key
    args = ("ddim", 8, 1.0, 40, 0, "net")
    names = ["superres:cpu-c16-aaa", "superres:cpu-c64-bbb", "cpu-c16-aaa/superres", "cpu-c64-bbb/superres"]
    for d in ("cpu-c16-aaa", "cpu-c64-bbb"): (tmp_path / d).mkdir()
    keys = [evaluation_key("ci", n, "final", *args) for n in names]
    keys += [evaluation_key("ci", tmp_path / d, "final", *args) for d in ("cpu-c16-aaa", "cpu-c64-bbb")]
    assert len(set(keys[:4])) == 4 and keys[4] != keys[5]
    assert keys[0] == evaluation_key("ci", "superres:cpu-c16-aaa", "final", *args)
    # a run folder is keyed by its name (which holds its config hash), wherever the cache lives
    (tmp_path / "moved" / "cpu-c16-aaa").mkdir(parents=True)
    assert keys[4] == evaluation_key("ci", tmp_path / "moved" / "cpu-c16-aaa", "final", *args)


def test_paper_preset_evaluates_with_local_inception_and_clip(tmp_path, monkeypatch):
    """The paper protocol end to end on small local models: prompts are the test folder's captions, FID uses the
    Inception path against the test folder (a stand-in feature network in place of the weights these machines lack),
    agreement is the CLIP score of a local CLIP model; a missing file is named before any sampling."""
    import math
    import torch
    import numpy as np
    from PIL import Image
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel
    from ldm_paper import metrics
    from ldm_paper.autoencoder import ae_config
    from ldm_paper.text import save_tiny_clip
    monkeypatch.setenv("LDM_PAPER_CACHE", str(tmp_path / "cache"))
    for v in ("LDM_PAPER_INCEPTION", "LDM_PAPER_CLIP"): monkeypatch.delenv(v, raising=False)
    captions = ["a red bag", "a blue shirt", "a red shirt", "a blue bag"]
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        d = tmp_path / split; d.mkdir()
        for i, c in enumerate(captions):
            Image.fromarray(rng.integers(0, 255, (80, 80, 3), dtype=np.uint8)).save(d / f"{i}.png")
        (d / "captions.csv").write_text("file,caption\n" + "".join(f"{i}.png,{c}\n" for i, c in enumerate(captions)))
    AutoencoderKL(**ae_config(image_channels=3, block_out_channels=(8, 8, 8, 8), image_size=512)).save_pretrained(tmp_path / "vae")
    save_tiny_clip(tmp_path / "clip_text", captions=captions)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(8, 8), layers_per_block=1,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=32, norm_num_groups=4, attention_head_dim=2)
    unet.save_pretrained(tmp_path / "student" / "model")
    clip = CLIPConfig(text_config=dict(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1),
                      vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         image_size=32, patch_size=8), projection_dim=8)
    CLIPModel(clip).save_pretrained(tmp_path / "clip")
    import shutil
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (tmp_path / "clip_text" / f).exists(): shutil.copy(tmp_path / "clip_text" / f, tmp_path / "clip" / f)
    for k, v in dict(LDM_PAPER_DATA=tmp_path / "train", LDM_PAPER_TEST_DATA=tmp_path / "test", LDM_PAPER_VAE=tmp_path / "vae",
                     LDM_PAPER_CLIP_TEXT=tmp_path / "clip_text").items():
        monkeypatch.setenv(k, str(v))
    with pytest.raises(FileNotFoundError, match="eval.clip .*LDM_PAPER_CLIP"):
        evaluate("paper", tmp_path / "student" / "model", 64, steps=1, cfg_scale=2.0, n_samples=4, kind="distilled")
    monkeypatch.setenv("LDM_PAPER_CLIP", str(tmp_path / "clip"))
    (tmp_path / "inception").mkdir(); monkeypatch.setenv("LDM_PAPER_INCEPTION", str(tmp_path / "inception"))
    seen = []
    def fake_extractor(path, device="cpu"):
        def extract(x):                      # clean-fid hands it (N, 3, 299, 299) floats in [0, 255]
            seen.append(tuple(x.shape)); return torch.stack([x.mean(dim=(1, 2, 3)), x.std(dim=(1, 2, 3))], 1)
        extract.name = "stand-in features"
        return extract
    monkeypatch.setattr(metrics, "inception_extractor", fake_extractor)
    row = evaluate("paper", tmp_path / "student" / "model", 64, steps=1, cfg_scale=2.0, n_samples=4, kind="distilled")
    assert row["feature_net"] == "stand-in features" and row["agreement_kind"] == "CLIP score"
    assert row["reference"].startswith("captioned folder") and row["n_reference"] == 4 and row["n_samples"] == 4
    assert math.isfinite(row["fid"]) and row["fid"] >= 0 and 0 <= row["agreement"] <= 100
    assert all(s[1:] == (3, 299, 299) for s in seen)          # generated 512x512 and test 80x80 both resized cleanly
    assert evaluate("paper", tmp_path / "student" / "model", 64, steps=1, cfg_scale=2.0, n_samples=4, kind="distilled") == row
    # the FID floor and the feature networks' description work for a folder too (no labelled split needed)
    floor = metrics.fid_floor("paper", 3)
    assert math.isfinite(floor) and floor >= 0 and metrics.fid_floor("paper", 3, seed=1) != floor
    assert metrics.eval_net_info("paper")["arch"] == "inception" and metrics.eval_net_info("paper", "b")["arch"] == "clip"
    with pytest.raises(ValueError, match=r"n must be in \[1, 4\]"):
        metrics.fid_floor("paper", 5)


def test_an_evaluation_given_a_preset_never_looks_it_up_again(runs, monkeypatch):
    import ldm_paper.presets as presets
    p, looked_up, real = presets.get_preset("ci"), [], presets.get_preset
    monkeypatch.setattr(presets, "get_preset", lambda name, **kw: looked_up.append(name) or real(name, **kw))
    df = evaluate_grid(p, widths=(16,), steps=(2,), cfg_scales=(3.0,), n_samples=20, progress=False)
    assert looked_up == [] and len(df) == 1 and df.preset.iloc[0] == "ci"   # training, eval nets, reference, scoring
    evaluate("ci", runs[16], 16, steps=2, cfg_scale=3.0, n_samples=20)        # a name: one lookup, at the entry
    assert looked_up == ["ci"]


def test_compiled_sampling_is_its_own_row_with_the_same_fid(runs, monkeypatch):
    import dataclasses
    import ldm_paper.family as family
    from torch._dynamo.utils import counters
    from ldm_paper.presets import get_preset
    monkeypatch.setattr(family, "COMPILE_BACKEND", "aot_eager")    # dynamo's capture without inductor's minutes of codegen
    p = get_preset("ci")
    pc = dataclasses.replace(p, eval={**p["eval"], "compile": True})
    a = evaluate(p, runs[16], 16, steps=2, cfg_scale=3.0, n_samples=20)
    counters.clear()
    b = evaluate(pc, runs[16], 16, steps=2, cfg_scale=3.0, n_samples=20, force=True)
    assert counters["stats"]["unique_graphs"] >= 1              # the UNet's forward went through torch.compile
    assert b["key"] != a["key"] and b["compile"] is True and "compile" not in a
    assert b["fid"] == pytest.approx(a["fid"], rel=1e-4)


def test_eager_keys_are_unchanged_and_compiled_rows_are_their_own_group():
    import pandas as pd
    from ldm_paper.core import config_hash
    from ldm_paper.evaluate import evaluation_key, RESULT_VERSION
    args = ("ci", "m", "final", "ddim", 2, 3.0, 20, 0, "net")
    old = config_hash(dict(v=RESULT_VERSION, preset="ci", model="m", checkpoint="final", sampler="ddim", steps=2, cfg=3.0,
                           n=20, seed=0, net="net"))          # the key every committed row was stored under
    assert evaluation_key(*args) == evaluation_key(*args, compile=False) == old != evaluation_key(*args, compile=True)
    df = pd.DataFrame(dict(kind="base", width=16, checkpoint="final", sampler="ddim", steps=8, cfg_scale=[1.0, 3.0, 3.0],
                           fid=[5.0, 4.0, 3.0], compile=[None, None, True]))
    best = best_over_cfg(df)
    assert list(zip(best["compile"], best["fid"])) == [(False, 4.0), (True, 3.0)]


EVAL_RUNNER = textwrap.dedent("""
    import sys, json
    from pathlib import Path
    import torch
    from accelerate import Accelerator
    from ldm_paper.evaluate import evaluate
    acc = Accelerator(cpu=not torch.cuda.is_available())      # without cpu=True a CUDA-less launch is n copies of 1 process
    row = evaluate("ci", sys.argv[1], 16, steps=2, cfg_scale=3.0, n_samples=30, seed=7, force=True, accelerator=acc)
    Path(sys.argv[2], f"rank{acc.process_index}.json").write_text(json.dumps(dict(world=acc.num_processes, **row)))
""")


def test_two_processes_give_the_fid_of_one(runs, tmp_path):
    """Each of 2 processes generates its own seed range (15 images each), the main one scores the gathered features:
    the same FIDs, spreads and agreement as 1 process generating all 30, and both processes return that one row."""
    from ldm_paper.train import launch_command
    script = tmp_path / "run.py"; script.write_text(EVAL_RUNNER)
    one = evaluate("ci", runs[16], 16, steps=2, cfg_scale=3.0, n_samples=30, seed=7, force=True)
    r = subprocess.run(launch_command(2, script, runs[16], tmp_path), capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert [x["world"] for x in rows] == [2, 2] and rows[0] == rows[1]      # two processes ran; one row
    two = rows[0]
    for k in ("fid", "fid_b", "fid_sd", "fid_b_sd", "agreement"):
        assert two[k] == pytest.approx(one[k], rel=1e-4, abs=1e-6), k
    assert two["key"] == one["key"] and two["n_samples"] == 30


def test_evaluation_streams_images_a_block_at_a_time(runs, monkeypatch):
    """Memory does not grow with the number of samples: images are decoded and measured a block at a time, and only
    features outlive a block (40 images in blocks of 8: no decode sees more than 8; the features cover all 40)."""
    import ldm_paper.evaluate as ev
    seen, real = [], ev.decode
    monkeypatch.setattr(ev, "EVAL_BLOCK", 8)
    monkeypatch.setattr(ev, "decode", lambda ae, lat: seen.append(len(lat)) or real(ae, lat))
    row = evaluate("ci", runs[16], 16, steps=2, cfg_scale=3.0, n_samples=40, seed=3, force=True)
    assert seen == [8] * 5 and row["n_samples"] == 40
