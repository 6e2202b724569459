import copy
import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import UNet2DConditionModel

from ldm_paper.diffusion import add_noise, alpha_sigma, ddim_step, log_snr, pred_to_x_eps
from ldm_paper.distill import (GaussianDenoiser, distill, distill_loss, distill_stage, list_stages, load_student,
                               stage_batch, student_grid, student_target, teacher_times, teacher_two_steps, x_prediction)
from ldm_paper.family import build_unet, get_scale
from ldm_paper.sampling import ExactDenoiser, make_scheduler, sample
from ldm_paper.train import TrainData, synthetic_data

TINY = dict(start_steps=4, updates_per_stage=3, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_unet(get_scale("cpu").config(16)).eval()


@pytest.fixture(scope="module")
def data():
    return synthetic_data(32)


def _weights(path):
    return UNet2DConditionModel.from_pretrained(path).state_dict()


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


# --- the grid -------------------------------------------------------------------------------------------------------

def test_grid_is_diffusers_ddim_and_the_teacher_grid_interleaves():
    for n in [2 ** i for i in range(11)]:
        s = make_scheduler("ddim"); s.set_timesteps(n)
        assert s.timesteps.tolist() == student_grid(n).tolist() == [k * 1024 // n - 1 for k in range(n, 0, -1)]
    assert student_grid(4).tolist() == [1023, 767, 511, 255]
    t1, t2 = teacher_times(student_grid(4), 4)
    assert t1.tolist() == [895, 639, 383, 127] and t2.tolist() == [767, 511, 255, -1]
    for n in (1, 2, 16, 512):
        t1, t2 = teacher_times(student_grid(n), n)
        merged = torch.stack([student_grid(n), t1]).T.flatten().tolist()
        assert merged == student_grid(2 * n).tolist()            # the teacher of N steps samples with 2N steps
        assert t2.tolist() == student_grid(n).tolist()[1:] + [-1]


# --- the target -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,ks", [(1, [0]), (2, [0, 1]), (8, [0, 3, 7]), (64, [0, 40, 63]), (512, [0, 255, 511])])
@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_one_student_step_on_x_tilde_lands_on_two_teacher_steps(unet, n, ks, cfg_scale):
    g = torch.Generator().manual_seed(n)
    t = student_grid(n)[torch.tensor(ks)]
    z_t = torch.randn(len(t), 4, 8, 8, generator=g)
    ctx, null = torch.randn(len(t), 8, 128, generator=g), torch.zeros(8, 128)
    z_tpp = teacher_two_steps(unet, z_t, t, n, ctx, null, cfg_scale)
    tpp = teacher_times(t, n)[1]
    x_tilde = student_target(z_t, z_tpp, t, tpp)
    assert torch.allclose(ddim_step(x_tilde, z_t, t, tpp), z_tpp, atol=1e-5, rtol=0)
    # and the two teacher steps are what they should be: DDIM with the guided x-prediction, twice
    t1 = teacher_times(t, n)[0]
    z1 = ddim_step(x_prediction(unet, z_t, t, ctx, null, cfg_scale), z_t, t, t1)
    assert torch.allclose(ddim_step(x_prediction(unet, z1, t1, ctx, null, cfg_scale), z1, t1, tpp), z_tpp, atol=1e-6)


def test_last_step_target_is_the_teachers_midpoint_x_prediction(unet):
    t = torch.tensor([255, 255]); z_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(2, 8, 128, generator=torch.Generator().manual_seed(1))
    z_tpp = teacher_two_steps(unet, z_t, t, 4, ctx)
    z_mid = ddim_step(x_prediction(unet, z_t, t, ctx), z_t, t, torch.tensor([127, 127]))
    x_mid = x_prediction(unet, z_mid, torch.tensor([127, 127]), ctx)
    assert torch.equal(student_target(z_t, z_tpp, t, torch.tensor([-1, -1])), z_tpp)
    assert torch.allclose(z_tpp, x_mid, atol=1e-6)


def test_guided_x_prediction_with_per_sample_timesteps(unet):
    z, t = torch.randn(3, 4, 8, 8), torch.tensor([1023, 511, 63])
    ctx, null = torch.randn(3, 8, 128), torch.zeros(1, 8, 128)
    cond = pred_to_x_eps(unet(z, t, encoder_hidden_states=ctx).sample, z, t)[0]
    unc = pred_to_x_eps(unet(z, t, encoder_hidden_states=null.expand(3, -1, -1)).sample, z, t)[0]
    assert torch.allclose(x_prediction(unet, z, t, ctx, null, 5.0), unc + 5.0 * (cond - unc), atol=1e-5)


def test_exact_denoiser_target_is_x0():
    x0 = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(3))
    for n in (1, 4, 32):
        t = student_grid(n)[torch.tensor([0, n - 1])]
        z_t = add_noise(x0.expand(2, -1, -1, -1), torch.randn(2, 4, 8, 8), t)
        for w in (1.0, 3.0):
            z_tpp = teacher_two_steps(ExactDenoiser(x0), z_t, t, n, torch.randn(2, 8, 128), torch.zeros(8, 128), w)
            assert torch.allclose(student_target(z_t, z_tpp, t, teacher_times(t, n)[1]), x0.expand(2, -1, -1, -1), atol=1e-4)


# --- the loss -------------------------------------------------------------------------------------------------------

class _Fixed(torch.nn.Module):
    """Outputs the given x_hat in parametrization `kind` (x or v), whatever the input."""
    def __init__(self, x_hat, kind):
        super().__init__(); self.x_hat, self.kind, self.p = x_hat, kind, torch.nn.Parameter(torch.zeros(()))

    def forward(self, z, t, encoder_hidden_states=None):
        if self.kind == "x": return SimpleNamespace(sample=self.x_hat + self.p)
        a, s = (v.reshape(-1, 1, 1, 1) for v in alpha_sigma(torch.as_tensor(t).reshape(-1)))
        return SimpleNamespace(sample=(a * z - self.x_hat) / s + self.p)    # v with alpha z - sigma v = x_hat


def test_loss_is_truncated_snr_weighted_x_error_for_any_parametrization(unet, data):
    b = stage_batch(data, 4, 8, seed=1)
    b["t"] = torch.tensor([1023, 767, 511, 255] * 2)
    x_hat = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    z_t = add_noise(b["x"], b["eps"], b["t"])
    snr = log_snr(b["t"]).exp()
    for kind in ("x", "v"):      # the teacher's output is read in the same parametrization (the student is its copy)
        z_tpp = teacher_two_steps(unet, z_t, b["t"], 4, b["context"], prediction_type=kind)
        mse = (student_target(z_t, z_tpp, b["t"], teacher_times(b["t"], 4)[1]) - x_hat).pow(2).flatten(1).mean(1)
        got = distill_loss(_Fixed(x_hat, kind), unet, b, 4, prediction_type=kind, reduce=False)
        assert torch.allclose(got, snr.clamp(min=1) * mse, rtol=1e-3)
        got = distill_loss(_Fixed(x_hat, kind), unet, b, 4, weighting="snr+1", prediction_type=kind, reduce=False)
        assert torch.allclose(got, (snr + 1) * mse, rtol=1e-3)
    # at t = 1023 (SNR ~ 2e-9) the truncated weight is 1, not ~0
    assert distill_loss(_Fixed(x_hat, "v"), unet, b, 4, reduce=False)[0].item() == pytest.approx(mse[0].item(), rel=1e-4)


def test_stage_batch_is_seeded_and_on_the_grid(data):
    a, b = stage_batch(data, 8, 64, seed=3, stage=2, update=5), stage_batch(data, 8, 64, seed=3, stage=2, update=5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["eps"], stage_batch(data, 8, 64, seed=3, stage=2, update=6)["eps"])
    assert not torch.equal(a["eps"], stage_batch(data, 8, 64, seed=3, stage=3, update=5)["eps"])
    assert set(a["t"].tolist()) == set(student_grid(8).tolist())              # all 8 student steps drawn at batch 64
    null = data.context_table[data.null_index]
    assert not (a["context"] == null).all(-1).all(-1).any()                   # cond_drop=0: always the caption
    dropped = (stage_batch(data, 8, 400, cond_drop=0.5)["context"] == null).all(-1).all(-1).float().mean()
    assert 0.4 < dropped < 0.6


# --- training: a Gaussian dataset whose exact denoiser is known ---------------------------------------------------------

def test_distilled_gaussian_student_reproduces_the_teacher_at_twice_the_steps():
    """The exact denoiser of N(mu, 0.25 I) is linear, DDIM is not exact for it (4 vs 2 steps differ by ~0.3), and the
    student x_hat = a_t z + b_t mu can represent x_tilde exactly: after a short stage its N-step samples must equal the
    teacher's 2N-step samples, far closer than the teacher's own N-step samples."""
    mu = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(2))
    d = TrainData(mu + 0.5 * torch.randn(1024, 4, 8, 8, generator=torch.Generator().manual_seed(3)),
                  torch.zeros(1024, dtype=torch.long), torch.zeros(2, 8, 128), null_index=1, fingerprint="gauss")
    ctx, teacher = torch.zeros(16, 8, 128), GaussianDenoiser(mu, 0.5)
    for stage, n in enumerate((4, 2, 1), start=1):
        student = copy.deepcopy(teacher)
        hist = distill_stage(teacher, student, d, n, updates=150, batch_size=64, lr=3e-2, stage=stage)
        assert hist["losses"][-1] < 1e-3 * hist["losses"][0]
        ref = sample(teacher, ctx, steps=2 * n)
        assert (sample(student, ctx, steps=n) - ref).abs().max() < 1e-2
        assert (sample(teacher, ctx, steps=n) - ref).abs().max() > 0.25
        teacher = student


# --- the driver -----------------------------------------------------------------------------------------------------

def test_halving_schedule_and_saved_stages(unet, data, tmp_path):
    stages = distill(unet, data, tmp_path / "d", start_steps=64, updates_per_stage=1, batch_size=2, progress=False)
    assert list(stages) == [32, 16, 8, 4, 2, 1]
    metas = list_stages(stages)
    assert [m["stage"] for m in metas] == [1, 2, 3, 4, 5, 6] and all(m["teacher_steps"] == 2 * m["steps"] for m in metas)
    assert [m["teacher"] for m in metas[1:]] == ["steps-0032", "steps-0016", "steps-0008", "steps-0004", "steps-0002"]
    assert metas[0]["teacher_cfg_scale"] == 1.0 and all(m["updates"] == 1 for m in metas)
    # a stage is a plain diffusers folder
    u = UNet2DConditionModel.from_pretrained(stages[4])
    assert u.config.block_out_channels == [16, 32, 64, 64]
    assert _same(u.state_dict(), load_student(tmp_path / "d", 4).state_dict())
    assert json.loads((tmp_path / "d" / "done.json").read_text())["steps"] == [32, 16, 8, 4, 2, 1]
    assert not (tmp_path / "d" / "state.pt").exists()


def test_guided_distillation_folds_guidance_in_at_the_first_stage_only(unet, data, tmp_path):
    stages = distill(unet, data, tmp_path / "g", cfg_scale=3.0, **TINY)
    metas = list_stages(stages)
    assert [m["teacher_cfg_scale"] for m in metas] == [3.0, 1.0] and all(m["cfg_scale"] == 3.0 for m in metas)
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    assert cfg["settings"]["cond_drop"] == 0.0                    # the guided student always sees the caption


def test_resume_skips_finished_stages_and_equals_an_uninterrupted_run(unet, data, tmp_path):
    ref = distill(unet, data, tmp_path / "ref", save_every=1, **TINY)
    out = tmp_path / "run"
    first = distill(unet, data, out, stop_after_stage=1, save_every=1, **TINY)
    assert list(first) == [2] and not (out / "steps-0001").exists()
    stamp = (out / "steps-0002" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    # interrupted again inside stage 2, after its first update: the resume state is on disk
    assert list(distill(unet, data, out, stop_after_updates=4, save_every=1, **TINY)) == [2]
    assert torch.load(out / "state.pt", weights_only=False)["history"]["update"] == 1
    got = distill(unet, data, out, save_every=1, **TINY)
    assert (out / "steps-0002" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    for n in (2, 1):
        assert _same(_weights(ref[n]), _weights(got[n]))
    assert (out / "log.csv").read_text().count("\n") == 3            # header + one row per stage, none duplicated
    assert not (out / "state.pt").exists()


def test_cache_folder_is_keyed_by_teacher_and_settings(unet, data, tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_PAPER_CACHE", str(tmp_path))
    a = distill(unet, data, start_steps=2, updates_per_stage=1, batch_size=2, progress=False)
    b = distill(unet, data, start_steps=2, updates_per_stage=1, batch_size=2, lr=1e-3, progress=False)
    assert a[1].parent.parent == tmp_path / "distill" and a[1].parent.name.startswith("c16-")
    assert a[1].parent != b[1].parent


# --- errors ---------------------------------------------------------------------------------------------------------

def test_bad_arguments_fail_before_any_work(unet, data, tmp_path):
    for bad in (48, 0, 1, 2048, 64.0, True):
        with pytest.raises(ValueError, match=r"start_steps must be a power of two in 2\.\.1024"):
            distill(unet, data, tmp_path / "x", start_steps=bad)
    with pytest.raises(ValueError, match=r"weighting='snr' is not allowed; choose one of \['truncated_snr', 'snr\+1'\]"):
        distill(unet, data, tmp_path / "x", weighting="snr")
    with pytest.raises(ValueError, match="cfg_scale"):
        distill(unet, data, tmp_path / "x", cfg_scale=0.5)
    for name in ("updates_per_stage", "batch_size"):
        with pytest.raises(ValueError, match=name):
            distill(unet, data, tmp_path / "x", **{name: 0})
    with pytest.raises(TypeError, match="data must be"):
        distill(unet, {"latents": None}, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_eps_teacher_is_refused_naming_prediction_type(unet, data, tmp_path):
    with pytest.raises(ValueError, match="prediction_type='eps' cannot be distilled"):
        distill(unet, data, tmp_path / "x", prediction_type="eps")
    run = tmp_path / "eps-run"; run.mkdir()                       # a run folder of an eps model: refused unloaded
    (run / "config.json").write_text(json.dumps({"train": {"prediction_type": "eps"}}))
    with pytest.raises(ValueError, match="prediction_type='eps' cannot be distilled"):
        distill(run, data, tmp_path / "x")
    with pytest.raises(ValueError, match="prediction_type='v' disagrees"):
        distill(run, data, tmp_path / "x", prediction_type="v")


def test_other_settings_in_the_same_folder_are_refused(unet, data, tmp_path):
    distill(unet, data, tmp_path / "d", start_steps=2, updates_per_stage=1, batch_size=2, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        distill(unet, data, tmp_path / "d", start_steps=2, updates_per_stage=2, batch_size=2, progress=False)
    with pytest.raises(ValueError, match=r"steps=8 has no distilled student here; available: \[1\]"):
        load_student(tmp_path / "d", 8)


# --- under accelerate, in micro-batches -------------------------------------------------------------------------------

def test_micro_batches_accumulate_to_the_whole_batch(unet, data):
    from ldm_paper.train import backward_in_micro_batches
    b = stage_batch(data, 4, 8, update=2)
    loss_of = lambda model, rows: distill_loss(model, unet, rows, 4, prediction_type="v")
    grads, losses = {}, {}
    for mb in (None, 4, 3):                                             # whole, 4 + 4, 3 + 3 + 2
        student = copy.deepcopy(unet).train()
        losses[mb] = float(backward_in_micro_batches(student, loss_of, b, mb))
        grads[mb] = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
    for mb in (4, 3):   # unweighted shares, or only the last micro-batch, would be off by a factor, not by rounding
        assert losses[mb] == pytest.approx(losses[None], rel=1e-5)
        torch.testing.assert_close(grads[mb], grads[None], rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="micro_batch must be None or a positive int"):
        distill(unet, data, micro_batch=0, **TINY)


DISTILL_RUNNER = """
import copy, json, sys, torch
from pathlib import Path
from accelerate import Accelerator
from ldm_paper.consistency import consistency_distill
from ldm_paper.distill import distill
from ldm_paper.family import build_unet, get_scale
from ldm_paper.train import synthetic_data
out = Path(sys.argv[1]); acc = Accelerator(cpu=True) if sys.argv[2] == "accelerate" else None
torch.manual_seed(0); teacher = build_unet(get_scale("cpu").config(16)).eval()
kw = dict(batch_size=8, progress=False, micro_batch=int(sys.argv[3]) if sys.argv[3] != "none" else None, accelerator=acc)
distill(teacher, synthetic_data(32), out / "pd", start_steps=4, updates_per_stage=3, cfg_scale=2.0, **kw)
consistency_distill(teacher, synthetic_data(32), out / "cd", grid=4, updates=3, cfg_scale=2.0, **kw)
if acc is not None: (out / f"rank{acc.process_index}.txt").write_text(str(acc.num_processes))
"""


def test_two_processes_in_micro_batches_distil_as_one(tmp_path, monkeypatch):
    """Both distillations under a real 2-process `accelerate launch --cpu`, each process 4 of the 8 rows in micro-batches
    of 2, against one process on the whole batch (the same script, run in this process): the same losses and students
    (DDP averages the two halves)."""
    import os, runpy, subprocess, sys
    from ldm_paper.train import launch_command
    script = tmp_path / "run.py"; script.write_text(DISTILL_RUNNER)
    r = subprocess.run(launch_command(2, script, tmp_path / "two", "accelerate", "2"), capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert sorted(p.read_text() for p in (tmp_path / "two").glob("rank*.txt")) == ["2", "2"]     # two processes, not one
    monkeypatch.setattr(sys, "argv", [str(script), str(tmp_path / "one"), "none", "none"])
    runpy.run_path(str(script), run_name="__main__")
    for sub, folders in (("pd", ["steps-0002", "steps-0001"]), ("cd", ["model"])):
        one, two = (tmp_path / d / sub for d in ("one", "two"))
        col = lambda f: [float(v) for v in (row.split(",")[(f.read_text().splitlines()[0].split(",")).index("loss")]
                                             for row in f.read_text().splitlines()[1:])]
        assert col(two / "log.csv") == pytest.approx(col(one / "log.csv"), abs=1e-5)
        for f in folders:      # up to the rounding of the all-reduce, which Adam can amplify to a fraction of one lr step
            a, b = _weights(one / f), _weights(two / f)
            assert all(torch.allclose(a[k], b[k], atol=2e-4, rtol=0) for k in a), f"{sub}/{f}"
        assert not (two / "state.pt").exists()
        assert [json.loads((d / "config.json").read_text())["processes"] for d in (one, two)] == [1, 2]
