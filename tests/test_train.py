import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from ldm_paper.train import (TrainConfig, launch_command, TrainData, list_checkpoints, load_unet, run_compute, run_dir, step_batch,
                             synthetic_data, train)

BIN = Path(sys.executable).parent
CFG = dict(width=16, steps=10, batch_size=8, warmup_steps=2, save_every=2, log_every=2)


def _weights(path):
    return UNet2DConditionModel.from_pretrained(path).state_dict()


def _same(a, b, atol=0.0):
    return all(torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)


RUNNER = textwrap.dedent("""
    import sys, json
    from pathlib import Path
    from accelerate import PartialState
    from ldm_paper.train import TrainConfig, synthetic_data, train
    cfg = TrainConfig(**json.loads(sys.argv[1]))
    train(cfg, synthetic_data(64), sys.argv[2], progress=False)
    s = PartialState()
    Path(sys.argv[2], f"rank{s.process_index}.txt").write_text(str(s.num_processes))   # how many processes really ran
""")


def test_resume_after_sigkill_gives_identical_weights(tmp_path):
    ref = train(TrainConfig(**CFG), synthetic_data(64), tmp_path / "ref", progress=False)
    script = tmp_path / "run.py"; script.write_text(RUNNER)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(CFG), str(out)])
    deadline = time.time() + 120
    while time.time() < deadline:
        p = out / "state" / "progress.json"
        if p.exists() and json.loads(p.read_text())["step"] >= 4: break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL); proc.wait()
    assert not (out / "done.json").exists(), "the run finished before it could be killed"
    train(TrainConfig(**CFG), synthetic_data(64), out, progress=False)
    assert _same(_weights(ref / "unet_ema"), _weights(out / "unet_ema"))
    rows = (out / "log.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == [2, 4, 6, 8, 10]   # no duplicated or missing log rows


def test_finished_run_is_not_retrained(tmp_path):
    out = train(TrainConfig(**CFG), synthetic_data(64), tmp_path / "r", progress=False)
    stamp = (out / "unet_ema" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    train(TrainConfig(**CFG), synthetic_data(64), out, progress=False)
    assert (out / "unet_ema" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp


def test_milestone_checkpoints_load_with_from_pretrained(tmp_path):
    gf = run_compute(TrainConfig(**CFG))["forward_gflops"]
    cfg = TrainConfig(**{**CFG, "milestones": (3 * gf, 7 * gf)})
    out = train(cfg, synthetic_data(64), tmp_path / "m", progress=False)
    cps = list_checkpoints(out)
    assert [c["step"] for c in cps] == [3, 7]
    assert cps[1]["train_compute"] == pytest.approx(7 * gf)
    unet = UNet2DConditionModel.from_pretrained(out / "checkpoints" / cps[0]["name"])
    assert unet.config.block_out_channels == [16, 32, 64, 64]
    assert not _same(unet.state_dict(), load_unet(out).state_dict())
    with pytest.raises(FileNotFoundError, match="available"):
        load_unet(out, "step-0000005")


def test_training_reduces_the_loss(tmp_path):
    cfg = TrainConfig(width=16, steps=60, batch_size=16, warmup_steps=5, lr=1e-3, log_every=10, save_every=1000)
    out = train(cfg, synthetic_data(1, classes=1), tmp_path / "l", progress=False)   # one point: learnable exactly
    losses = [float(r.split(",")[1]) for r in (out / "log.csv").read_text().splitlines()[1:]]
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.parametrize("bad, message", [
    (dict(prediction_type="score"), "prediction_type='score'"),
    (dict(width=20), "width=20 is not in the cpu family"),
    (dict(steps=-1), "steps must be a positive int"),
    (dict(cond_drop=1.5), "cond_drop must be in"),
    (dict(weighting="l1"), "weighting='l1'"),
])
def test_bad_parameters_fail_before_training(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        train(TrainConfig(**{**CFG, **bad}), synthetic_data(8), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()   # nothing was started


def test_process_slices_cover_the_global_batch():
    data, cfg = synthetic_data(64), TrainConfig(**CFG)
    whole = step_batch(data, cfg, 5)
    halves = [step_batch(data, cfg, 5, r, 2) for r in range(2)]
    for k in whole:
        assert torch.equal(torch.cat([h[k] for h in halves]), whole[k])


def test_accelerate_launch_two_processes_matches_one(tmp_path):
    script = tmp_path / "run.py"; script.write_text(RUNNER)
    cfg = {**CFG, "steps": 4}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = launch_command(2, script, json.dumps(cfg), tmp_path / "ddp")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.read_text() for p in (tmp_path / "ddp").glob("rank*.txt")) == ["2", "2"]   # two processes, not one
    single = train(TrainConfig(**cfg), synthetic_data(64), tmp_path / "single", progress=False)
    # the same global batch split over two processes: the same losses, and the same weights up to the rounding of the
    # gradient all-reduce (which Adam can amplify to a fraction of one lr-sized step where a gradient is ~0)
    loss = lambda d: [float(r.split(",")[1]) for r in (d / "log.csv").read_text().splitlines()[1:]]
    assert loss(single) == pytest.approx(loss(tmp_path / "ddp"), abs=1e-5)
    assert _same(_weights(single / "unet_ema"), _weights(tmp_path / "ddp" / "unet_ema"), atol=cfg.get("lr", 3e-4))


FSDP_RUNNER = textwrap.dedent("""
    import sys, json
    from pathlib import Path
    from ldm_paper.train import TrainConfig, fsdp_accelerator, synthetic_data, train
    cfg, out = TrainConfig(**json.loads(sys.argv[1])), Path(sys.argv[2])
    acc = fsdp_accelerator()
    train(cfg, synthetic_data(64), out / "whole", accelerator=acc, progress=False)
    train(cfg, synthetic_data(64), out / "split", accelerator=fsdp_accelerator(), progress=False, stop_after=2)
    assert not (out / "split" / "done.json").exists()
    train(cfg, synthetic_data(64), out / "split", accelerator=fsdp_accelerator(), progress=False)   # resumes at step 2
    (out / f"rank{acc.process_index}.txt").write_text(f"{acc.num_processes} {acc.distributed_type}")
""")


def test_fsdp_two_processes_match_one_and_resume_bit_for_bit(tmp_path):
    "FSDP2 (the plan's strategy for c=768) through the same `train`: gathered EMA, whole-model save, sharded resume state."
    script = tmp_path / "run.py"; script.write_text(FSDP_RUNNER)
    cfg = {**CFG, "steps": 4, "micro_batch": 2, "ema_offload": True}
    r = subprocess.run(launch_command(2, script, json.dumps(cfg), tmp_path / "fsdp"), capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert sorted(p.read_text() for p in (tmp_path / "fsdp").glob("rank*.txt")) == ["2 DistributedType.FSDP"] * 2
    assert (tmp_path / "fsdp" / "split" / "state" / "pytorch_model_fsdp_0").is_dir()        # each process its shard
    single = train(TrainConfig(**cfg), synthetic_data(64), tmp_path / "single", progress=False)
    loss = lambda d: [float(r.split(",")[1]) for r in (d / "log.csv").read_text().splitlines()[1:]]
    whole = tmp_path / "fsdp" / "whole"
    assert loss(single) == pytest.approx(loss(whole), abs=1e-5)
    assert _same(_weights(single / "unet_ema"), _weights(whole / "unet_ema"), atol=cfg["lr"] if "lr" in cfg else 3e-4)
    assert _same(_weights(whole / "unet_ema"), _weights(tmp_path / "fsdp" / "split" / "unet_ema"))   # killed + resumed


# --- fine-tuning hooks: conditioning latents (`TrainData.concat_latents`) and a starting model (`init_from`) ---

def _with_concat(data, seed=1):
    import dataclasses
    g = torch.Generator().manual_seed(seed)
    return dataclasses.replace(data, concat_latents=torch.randn(data.latents.shape, generator=g))


def test_runs_from_scratch_keep_their_hashes():
    # literals computed with the loop before the hooks existed (git HEAD 2ce8333): cached runs keep their folders
    assert run_dir(TrainConfig(width=16), "data-x", root="R").name == "cpu-c16-8f3a975d79e2"
    assert run_dir(TrainConfig(width=24, steps=10, milestones=(1.5,)), "data-y", root="R").name == "cpu-c24-bb1ff39de9de"
    assert "init_from" not in TrainConfig(width=16).to_dict()
    data = synthetic_data(16)
    assert data.run_fingerprint == data.fingerprint
    assert _with_concat(data).run_fingerprint != data.fingerprint      # conditioned runs get their own folder


def test_concat_latents_are_fed_to_the_unet(tmp_path):
    cfg = TrainConfig(**{**CFG, "steps": 2, "log_every": 1})
    data = synthetic_data(64)
    assert step_batch(data, cfg, 3).keys() == {"x", "t", "eps", "context"}
    # the conditioning rows are those of the batch's latents, and the draws are those of the run without them
    cond = _with_concat(data, 1)
    plain, b = step_batch(data, cfg, 4), step_batch(cond, cfg, 4)
    assert all(torch.equal(plain[k], b[k]) for k in plain)
    idx = [int((data.latents == x).flatten(1).all(1).nonzero()[0]) for x in b["x"]]
    assert torch.equal(b["concat"], cond.concat_latents[idx])
    a = train(cfg, cond, tmp_path / "a", progress=False)
    c = train(cfg, _with_concat(data, 2), tmp_path / "c", progress=False)
    assert json.loads((a / "config.json").read_text())["unet"]["in_channels"] == 8
    loss = lambda d: [float(r.split(",")[1]) for r in (d / "log.csv").read_text().splitlines()[1:]]
    assert loss(a)[0] != loss(c)[0]                 # same model, same batch, other conditioning: another loss
    with pytest.raises(ValueError, match="concat_latents"):
        TrainData(data.latents, data.caption_index, data.context_table, data.null_index, "x", torch.zeros(3, 4, 8, 8))


def test_init_from_starts_from_the_given_unet(tmp_path):
    first = train(TrainConfig(**{**CFG, "steps": 4}), synthetic_data(64), tmp_path / "first", progress=False)
    fresh = train(TrainConfig(**{**CFG, "steps": 1}), synthetic_data(64), tmp_path / "fresh", progress=False)
    cfg = TrainConfig(**{**CFG, "steps": 1, "lr": 1e-10, "warmup_steps": 0, "init_from": first / "unet_ema"})
    ft = train(cfg, synthetic_data(64), tmp_path / "ft", progress=False)
    assert json.loads((ft / "config.json").read_text())["train"]["init_from"] == str(first / "unet_ema")
    # one AdamW step of lr 1e-10 from the given weights: still them, and far from a fresh model
    assert _same(_weights(ft / "unet_ema"), _weights(first / "unet_ema"), atol=1e-8)
    assert not _same(_weights(ft / "unet_ema"), _weights(fresh / "unet_ema"), atol=1e-6)
    with pytest.raises(ValueError, match="init_from=.* holds a UNet of width 16, not width=24"):
        TrainConfig(**{**CFG, "width": 24, "init_from": first / "unet_ema"}).validate()
    with pytest.raises(ValueError, match="init_from=.* takes in_channels=4"):
        train(cfg, _with_concat(synthetic_data(64)), tmp_path / "bad", progress=False)


# --- a step in micro-batches (gradient accumulation), gradient checkpointing ---

def _losses(d):
    return [float(r.split(",")[1]) for r in (d / "log.csv").read_text().splitlines()[1:]]


def test_micro_batches_accumulate_to_the_whole_batch(tmp_path):
    from accelerate import Accelerator
    from ldm_paper.train import _accumulate, build_unet, unet_config_for
    data, acc = synthetic_data(64), Accelerator(cpu=True)
    b = step_batch(data, TrainConfig(**CFG), 3)                          # 8 samples
    grads, losses = {}, {}
    for mb in (None, 4, 3):                                             # whole, 4 + 4, 3 + 3 + 2
        torch.manual_seed(0); model = build_unet(unet_config_for(TrainConfig(**CFG), data))
        losses[mb] = float(_accumulate(TrainConfig(**CFG, micro_batch=mb), acc, model, b))
        grads[mb] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    for mb in (4, 3):   # a wrong accumulation (unweighted shares, only the last micro-batch) is off by a factor, not 1e-5
        assert losses[mb] == pytest.approx(losses[None], rel=1e-5)
        torch.testing.assert_close(grads[mb], grads[None], rtol=1e-4, atol=1e-7)
    # a whole run in micro-batches: the same losses; the same weights up to Adam's amplification of float rounding
    # where a gradient is ~0 (a fraction of one lr-sized step, as in the two-process test)
    cfg = {**CFG, "steps": 4}
    whole = train(TrainConfig(**cfg), data, tmp_path / "whole", progress=False)
    parts = train(TrainConfig(**cfg, micro_batch=3), data, tmp_path / "parts", progress=False)
    assert _losses(parts) == pytest.approx(_losses(whole), abs=1e-5)
    assert _same(_weights(whole / "unet_ema"), _weights(parts / "unet_ema"), atol=TrainConfig(**cfg).lr)


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    cfg = {**CFG, "steps": 3}
    plain = train(TrainConfig(**cfg), synthetic_data(64), tmp_path / "plain", progress=False)
    ckpt = train(TrainConfig(**cfg, grad_checkpointing=True), synthetic_data(64), tmp_path / "ckpt", progress=False)
    assert _losses(ckpt) == pytest.approx(_losses(plain), abs=1e-6)
    assert _same(_weights(plain / "unet_ema"), _weights(ckpt / "unet_ema"), atol=TrainConfig(**cfg).lr)


@pytest.mark.parametrize("bad", [0, -2, 2.5, True])
def test_bad_micro_batch_is_named(tmp_path, bad):
    with pytest.raises(ValueError, match="micro_batch must be None or a positive int"):
        train(TrainConfig(**CFG, micro_batch=bad), synthetic_data(8), tmp_path / "x", progress=False)


def test_new_settings_stay_out_of_the_hash_at_their_defaults():
    base = run_dir(TrainConfig(width=16), "data-x", root="R").name
    assert run_dir(TrainConfig(width=16, micro_batch=None, grad_checkpointing=False, tf32=True), "data-x", root="R").name == base
    assert run_dir(TrainConfig(width=16, micro_batch=8), "data-x", root="R").name != base
    assert run_dir(TrainConfig(width=16, mixed_precision="no", ema_offload=False), "data-x", root="R").name == base
    assert run_dir(TrainConfig(width=16, mixed_precision="bf16"), "data-x", root="R").name != base


# --- bf16 autocast, EMA in host memory ---

def test_bf16_autocast_trains_close_to_fp32_but_not_identically(tmp_path):
    cfg = {**CFG, "steps": 4}
    fp32 = train(TrainConfig(**cfg), synthetic_data(64), tmp_path / "fp32", progress=False)
    bf16 = train(TrainConfig(**cfg, mixed_precision="bf16"), synthetic_data(64), tmp_path / "bf16", progress=False)
    a, b = _losses(fp32), _losses(bf16)
    assert b == pytest.approx(a, rel=0.03)            # bf16 products: ~3 significant digits
    assert a != b                                     # autocast did run: the losses are not fp32's bit for bit
    w = _weights(bf16 / "unet_ema")
    assert all(v.dtype == torch.float32 for v in w.values())   # weights and EMA stay fp32


def test_ema_offload_gives_the_same_weights(tmp_path):
    cfg = {**CFG, "steps": 4}
    dev = train(TrainConfig(**cfg), synthetic_data(64), tmp_path / "dev", progress=False)
    host = train(TrainConfig(**cfg, ema_offload=True), synthetic_data(64), tmp_path / "host", progress=False)
    assert _same(_weights(dev / "unet_ema"), _weights(host / "unet_ema"))


@pytest.mark.parametrize("field,bad,message", [("mixed_precision", "fp16", "mixed_precision='fp16'"),
                                               ("ema_offload", "yes", "ema_offload must be True or False"),
                                               ("compile", "inductor", "compile must be True or False")])
def test_bad_precision_settings_are_named(field, bad, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(width=16, **{field: bad}).validate()


def test_compiled_training_resumes_bit_for_bit_and_has_its_own_folder(tmp_path, monkeypatch):
    from torch._dynamo.utils import counters
    import ldm_paper.family as family      # aot_eager: inductor's graphs captured without its minutes of code generation
    monkeypatch.setattr(family, "COMPILE_BACKEND", "aot_eager")
    cfg, data = {**CFG, "steps": 4}, synthetic_data(64)
    counters.clear()
    whole = train(TrainConfig(**cfg, compile=True), data, tmp_path / "whole", progress=False)
    assert counters["stats"]["unique_graphs"] >= 1                 # the forward really went through torch.compile
    part = tmp_path / "part"
    train(TrainConfig(**cfg, compile=True), data, part, progress=False, stop_after=2)
    assert not (part / "done.json").exists()
    train(TrainConfig(**cfg, compile=True), data, part, progress=False)
    assert _same(_weights(whole / "unet_ema"), _weights(part / "unet_ema"))
    eager = train(TrainConfig(**cfg), data, tmp_path / "eager", progress=False)
    assert _same(_weights(whole / "unet_ema"), _weights(eager / "unet_ema"), atol=1e-5)   # the same training
    assert list(_weights(whole / "unet_ema")) == list(_weights(eager / "unet_ema"))        # diffusers' names, no wrapper prefix
    assert run_dir(TrainConfig(width=16, compile=True), "d", root="R").name != run_dir(TrainConfig(width=16), "d", root="R").name


# --- the memory plan ---

def test_activation_memory_is_linear_in_width_and_shrinks_with_bf16_and_checkpointing(tmp_path, monkeypatch):
    from ldm_paper.train import activation_memory
    monkeypatch.setenv("LDM_PAPER_CACHE", str(tmp_path))
    m = {c: activation_memory("cpu", c, "no")["per_sample"] for c in (16, 24, 48)}
    predicted = m[16] + (m[24] - m[16]) / 8 * 32            # the plan's extrapolation from two widths
    assert predicted == pytest.approx(m[48], rel=0.05)
    bf16 = activation_memory("cpu", 24, "bf16")
    assert 0.4 < bf16["per_sample"] / m[24] < 0.6           # bf16 activations: half of fp32's
    assert bf16["fixed"] > 0                                # autocast saves bf16 copies of the weights
    ckpt = activation_memory("cpu", 24, "no", grad_checkpointing=True)["per_sample"]
    assert ckpt < m[24] / 3


def test_paper_activations_come_from_the_committed_records_not_a_measurement(tmp_path, monkeypatch):
    import ldm_paper.train as T
    monkeypatch.setenv("LDM_PAPER_CACHE", str(tmp_path))
    def no_model(*a, **k): raise AssertionError("measured instead of read")
    monkeypatch.setattr(T, "build_unet", no_model)
    got = T.activation_memory("paper", 96, "bf16", grad_checkpointing=True)
    assert got["width"] == 96 and got["per_sample"] / 2**20 == pytest.approx(44.5, abs=0.05)   # README's plan table
    with pytest.raises(AssertionError, match="measured instead of read"):
        T.activation_memory("paper", 96, "bf16", grad_checkpointing=True, committed=False)
    with pytest.raises(AssertionError, match="measured instead of read"):   # a width with no record is measured
        T.activation_memory("paper", 128, "bf16")

def test_memory_plan_moves_from_ddp_to_fsdp_to_checkpointing(tmp_path, monkeypatch):
    from ldm_paper.train import memory_plan
    monkeypatch.setenv("LDM_PAPER_CACHE", str(tmp_path))
    big = memory_plan("cpu", (16, 48), 256, devices=4, device_gb=80)
    assert [(r["strategy"], r["grad_ckpt"], r["micro_batch"], r["accumulation"]) for r in big] == [("DDP", False, 64, 1)] * 2
    tight = {r["c"]: r for r in memory_plan("cpu", (16, 24, 32, 48), 256, devices=4, device_gb=0.2, min_micro=16)}
    assert tight[16]["strategy"] == "DDP" and tight[48]["strategy"] == "FSDP" and tight[48]["grad_ckpt"] is True
    assert tight[48]["ema"] == "host" and tight[16]["ema"] == "device"
    for r in tight.values():
        assert r["micro_batch"] * r["accumulation"] == 64 and r["peak_GB"] <= 0.2 * 0.9 + 1e-3
    none = memory_plan("cpu", (48,), 256, devices=4, device_gb=0.001, measure_widths=(16, 24))
    assert none[0]["strategy"] == "does not fit" and none[0]["micro_batch"] is None
    with pytest.raises(ValueError, match="global_batch=250 must be divisible by devices=4"):
        memory_plan("cpu", (16, 24), 250, devices=4)
