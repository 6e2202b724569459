from types import SimpleNamespace

import pytest
import torch

from ldm_paper.sampling import (SAMPLERS, ExactDenoiser, guided_prediction, make_scheduler, sample, sampling_cost,
                                sampling_gflops)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("steps", [1, 2, 4, 8, 16, 64])
def test_sampler_recovers_the_single_point(sampler, steps):
    x0 = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(1))
    out = sample(ExactDenoiser(x0), torch.zeros(2, 8, 16), sampler=sampler, steps=steps, seed=5)
    assert torch.allclose(out, x0.expand(2, -1, -1, -1), atol=1e-3)


class Scaler(torch.nn.Module):
    """A stand-in UNet whose output depends on the input, the timestep and the context."""
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.3))
        self.config = SimpleNamespace(in_channels=4, sample_size=8)

    def forward(self, z, t, encoder_hidden_states=None):
        c = encoder_hidden_states.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        return SimpleNamespace(sample=self.w * z + c)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_per_image_seeds_do_not_depend_on_batch_size(sampler):
    ctx = torch.randn(7, 8, 16, generator=torch.Generator().manual_seed(0))
    a = sample(Scaler(), ctx, sampler=sampler, steps=6, seed=11, batch_size=7)
    b = sample(Scaler(), ctx, sampler=sampler, steps=6, seed=11, batch_size=3)
    assert torch.allclose(a, b, atol=1e-6)
    # image 4 alone, asked for as index 4 of the run, is the same image
    c = sample(Scaler(), ctx[4:5], sampler=sampler, steps=6, seed=11, first_index=4)
    assert torch.allclose(a[4:5], c, atol=1e-6)
    assert not torch.allclose(a, sample(Scaler(), ctx, sampler=sampler, steps=6, seed=12), atol=1e-3)


def test_ddpm_is_stochastic_and_ddim_is_not_given_the_start():
    ctx = torch.zeros(2, 8, 16)
    ddim = sample(Scaler(), ctx, sampler="ddim", steps=8)
    ddpm = sample(Scaler(), ctx, sampler="ddpm", steps=8)
    assert not torch.allclose(ddim, ddpm, atol=1e-3)


def test_guidance_formula_in_one_batch():
    net, z = Scaler(), torch.randn(3, 4, 8, 8)
    ctx, null = torch.full((3, 8, 16), 2.0), torch.zeros(1, 8, 16)
    got = guided_prediction(net, z, 10, ctx, null, 4.0)
    cond, uncond = net(z, 10, ctx).sample, net(z, 10, null.expand(3, -1, -1)).sample
    assert torch.allclose(got, uncond + 4.0 * (cond - uncond))
    assert torch.allclose(guided_prediction(net, z, 10, ctx, null, 1.0), cond)


def test_guidance_with_per_sample_timesteps():
    """A different t per image (distillation's teacher) must pair each image with its own t in both halves."""
    from ldm_paper.family import unet_config
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config(16, 8, 32, norm_num_groups=8)).eval()
    z, t = torch.randn(3, 4, 8, 8), torch.tensor([1023, 511, 7])
    ctx, null = torch.randn(3, 8, 32), torch.zeros(1, 8, 32)
    with torch.no_grad():
        got = guided_prediction(unet, z, t, ctx, null, 3.0)
        for i in range(3):
            c = unet(z[i:i + 1], t[i], encoder_hidden_states=ctx[i:i + 1]).sample
            u = unet(z[i:i + 1], t[i], encoder_hidden_states=null).sample
            assert torch.allclose(got[i:i + 1], u + 3.0 * (c - u), atol=1e-5)


def test_costs():
    assert sampling_cost(0.13, 20) == pytest.approx(2.6)
    assert sampling_gflops(10.0, 20, cfg_scale=7.5) == 400 and sampling_gflops(10.0, 20) == 200


def test_bad_sampler_and_steps_fail_early():
    net, ctx = Scaler(), torch.zeros(1, 8, 16)
    with pytest.raises(ValueError, match=r"sampler='euler'.*\['ddim', 'ddpm', 'dpmsolver\+\+', 'consistency'\]"):
        sample(net, ctx, sampler="euler")
    for bad in (0, -4, 2000, 3.5):
        with pytest.raises(ValueError, match="steps must be an int in 1..1024"):
            sample(net, ctx, steps=bad)
    with pytest.raises(ValueError, match="null_context"):
        sample(net, ctx, cfg_scale=3.0)


def test_trailing_grid():
    s = make_scheduler("ddim"); s.set_timesteps(4)
    assert s.timesteps.tolist() == [1023, 767, 511, 255]
