"""Consistency distillation (Song et al. 2023, Algorithm 2), guided, in latent space: ldm_paper.consistency."""
import copy

import pytest
import torch
from diffusers import UNet2DConditionModel

from ldm_paper.consistency import (boundary_scalings, cd_batch, cd_target, consistency_distill, consistency_function,
                                   consistency_loss, consistency_train, load_consistency)
from ldm_paper.diffusion import NUM_TRAIN_TIMESTEPS, ddim_step
from ldm_paper.distill import GaussianDenoiser, student_grid, x_prediction
from ldm_paper.family import build_unet, get_scale
from ldm_paper.sampling import ExactDenoiser, make_scheduler, sample
from ldm_paper.train import TrainData, synthetic_data


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_unet(get_scale("cpu").config(16)).eval()


def test_boundary_condition_is_diffusers_lcm_and_identity_at_the_clean_end():
    lcm = make_scheduler("consistency")
    for t in (0, 1, 15, 255, 1023):
        assert [float(v) for v in boundary_scalings(t)] == pytest.approx(lcm.get_scalings_for_boundary_condition_discrete(t), abs=1e-12)
    assert [float(v) for v in boundary_scalings(-1)] == [1.0, 0.0]
    z = torch.randn(2, 4, 8, 8)
    assert torch.equal(consistency_function(ExactDenoiser(torch.zeros(4, 8, 8)), z, torch.tensor([-1, -1]), torch.zeros(2, 8, 16)), z)


@pytest.mark.parametrize("grid", [1, 4, 16])
def test_teacher_step_is_ddim_on_the_grid_and_last_target_is_the_x_prediction(unet, grid):
    ddim = make_scheduler("ddim"); ddim.set_timesteps(grid)
    ctx, z = torch.randn(1, 8, 128), torch.randn(1, 4, 8, 8)
    for t in student_grid(grid).tolist():
        s = t - NUM_TRAIN_TIMESTEPS // grid
        with torch.no_grad():
            ours = ddim_step(x_prediction(unet, z, torch.tensor([t]), ctx), z, torch.tensor([t]), torch.tensor([s]))
            theirs = ddim.step(unet(z, t, encoder_hidden_states=ctx).sample, t, z).prev_sample
        assert torch.allclose(ours, theirs, atol=1e-4), t
    null = torch.randn(8, 128)
    last = NUM_TRAIN_TIMESTEPS // grid - 1
    with torch.no_grad():
        goal = cd_target(unet, unet, z, torch.tensor([last]), torch.tensor([-1]), ctx, null, cfg_scale=3.0)
        assert torch.allclose(goal, x_prediction(unet, z, torch.tensor([last]), ctx, null, 3.0), atol=1e-5)


def test_batch_pairs_adjacent_grid_points_and_is_seeded():
    data = synthetic_data(32)
    b = cd_batch(data, grid=8, batch_size=64, seed=1, update=3)
    assert set(b["t"].tolist()) <= set(student_grid(8).tolist()) and torch.equal(b["s"], b["t"] - 128)
    assert (b["s"] == -1).any()
    assert all(torch.equal(v, cd_batch(data, 8, 64, 1, 3)[k]) for k, v in b.items())
    assert not torch.equal(b["eps"], cd_batch(data, 8, 64, 1, 4)["eps"])


def test_exact_denoiser_is_its_own_consistency_function():
    x0 = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(1))
    one = TrainData(x0[None].expand(16, -1, -1, -1).clone(), torch.zeros(16, dtype=torch.long), torch.zeros(2, 8, 128), 1, "one")
    b, exact = cd_batch(one, 16, 16), ExactDenoiser(x0)
    with torch.no_grad():
        for w in (1.0, 3.0):
            assert float(consistency_loss(exact, exact, exact, b, torch.zeros(8, 128), cfg_scale=w)) < 1e-5
        assert float(consistency_loss(ExactDenoiser(x0 + 0.3), exact, exact, b)) > 0.1      # a wrong student is not


def test_gaussian_student_samples_the_ode_end_in_one_step():
    """Known answer: for N(mu, 0.25 I) the exact teacher's 64-step DDIM sample is the ODE's end; after distillation the
    student's 1-step consistency sample is within a quarter of the distance of the teacher's own 1-step sample."""
    mu = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(2))
    data = TrainData(mu + 0.5 * torch.randn(2048, 4, 8, 8, generator=torch.Generator().manual_seed(3)),
                     torch.zeros(2048, dtype=torch.long), torch.zeros(2, 8, 128), 1, "gauss")
    teacher = GaussianDenoiser(mu, 0.5).eval()
    student, target = copy.deepcopy(teacher), copy.deepcopy(teacher)
    consistency_train(teacher, student, target, data, grid=16, updates=400, batch_size=64, lr=3e-2, ema_decay=0.9)
    ctx = torch.zeros(64, 8, 128)
    end = sample(teacher, ctx, steps=64, seed=7)
    err = lambda x: float((x - end).pow(2).mean().sqrt())
    e_teacher, e_student = err(sample(teacher, ctx, steps=1, seed=7)), err(sample(student, ctx, sampler="consistency", steps=1, seed=7))
    assert e_student < 0.25 * e_teacher, (e_student, e_teacher)
    xs = sample(student, torch.zeros(512, 8, 128), sampler="consistency", steps=4, seed=8)
    assert float((xs.mean(0) - mu).abs().mean()) < 0.05 and 0.35 < float(xs.std(0).mean()) < 0.6


def test_driver_writes_a_diffusers_model_resumes_exactly_and_returns_cached(unet, tmp_path):
    kw = dict(grid=4, updates=4, batch_size=8, save_every=1, log_every=2, cfg_scale=2.0, progress=False)
    data = synthetic_data(64)
    full = consistency_distill(unet, data, tmp_path / "full", **kw)
    consistency_distill(unet, data, tmp_path / "part", stop_after=2, **kw)
    assert (tmp_path / "part" / "state.pt").exists() and not (tmp_path / "part" / "model").exists()
    part = consistency_distill(unet, data, tmp_path / "part", **kw)
    a, b = (UNet2DConditionModel.from_pretrained(p / "model") for p in (full, part))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not (tmp_path / "part" / "state.pt").exists()
    stamp = (full / "model" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert consistency_distill(unet, data, tmp_path / "full", **kw) == full
    assert (full / "model" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    assert list(load_consistency(full).config.block_out_channels) == list(unet.config.block_out_channels)
    assert (full / "log.csv").read_text().splitlines()[0] == "update,loss,lr,grad_norm,seconds_per_update"


@pytest.mark.parametrize("kw,msg", [(dict(grid=48), "grid must be a power of two"), (dict(updates=0), "updates must be a positive int"),
                                    (dict(ema_decay=1.0), r"ema_decay must be in \[0, 1\)"), (dict(cfg_scale=0.5), "cfg_scale must be >= 1"),
                                    (dict(huber_c=0), "huber_c must be > 0"), (dict(prediction_type="eps"), "prediction_type='eps' cannot be distilled")])
def test_bad_settings_fail_before_any_work(unet, tmp_path, kw, msg):
    with pytest.raises(ValueError, match=msg):
        consistency_distill(unet, synthetic_data(8), tmp_path / "x", progress=False, **kw)
    assert not (tmp_path / "x").exists()
