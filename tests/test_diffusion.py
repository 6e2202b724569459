import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ldm_paper.diffusion import (NUM_TRAIN_TIMESTEPS, add_noise, alpha_sigma, ddim_step, diffusion_loss, log_snr,
                                 loss_weight, pred_to_x_eps, prediction_target, scheduler_config)


def test_cosine_schedule_known_values():
    a, s = alpha_sigma(torch.arange(NUM_TRAIN_TIMESTEPS))
    assert torch.allclose(a**2 + s**2, torch.ones(NUM_TRAIN_TIMESTEPS), atol=1e-6)
    # squaredcos_cap_v2: alpha_bar(t) = cos^2((t/T + 0.008)/1.008 * pi/2) / cos^2(0.008/1.008 * pi/2)
    T = NUM_TRAIN_TIMESTEPS
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    for t in (0, 255, 511, 767):
        assert a[t].item() ** 2 == pytest.approx(f((t + 1) / T) / f(0), rel=2e-3)
    assert log_snr(torch.tensor([0])).item() == pytest.approx(10.12, abs=0.01)
    assert log_snr(torch.tensor([1023])).item() == pytest.approx(-19.88, abs=0.01)  # ~ P2's clip at -20


def test_v_known_value_and_inversions():
    t = torch.tensor([511])
    a, s = (v.item() for v in alpha_sigma(t))
    x, eps = torch.full((1, 1), 1.0), torch.full((1, 1), 2.0)
    assert prediction_target(x, eps, t, "v").item() == pytest.approx(2 * a - s, abs=1e-6)
    z = add_noise(x, eps, t)
    assert z.item() == pytest.approx(a + 2 * s, abs=1e-6)
    for p in ("eps", "x", "v"):
        xh, eh = pred_to_x_eps(prediction_target(x, eps, t, p), z, t, p)
        assert xh.item() == pytest.approx(1.0, abs=1e-5) and eh.item() == pytest.approx(2.0, abs=1e-5)


def test_agrees_with_diffusers():
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([3, 512, 1020])
    ref = DDPMScheduler(**{k: v for k, v in scheduler_config().items() if k != "set_alpha_to_one"})
    assert torch.allclose(add_noise(x, eps, t), ref.add_noise(x, eps, t), atol=1e-5)
    assert torch.allclose(prediction_target(x, eps, t, "v"), ref.get_velocity(x, eps, t), atol=1e-5)


def test_weightings():
    snr = torch.tensor([0.01, 1.0, 100.0])
    assert loss_weight(snr, "truncated_snr").tolist() == pytest.approx([1.0, 1.0, 100.0])
    assert loss_weight(snr, "snr+1").tolist() == pytest.approx([1.01, 2.0, 101.0])
    assert loss_weight(snr, "min_snr").tolist() == pytest.approx([0.01, 1.0, 5.0])


def test_loss_is_weighted_x_error():
    g = torch.Generator().manual_seed(2)
    x, eps, pred = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([100, 600])
    z = add_noise(x, eps, t)
    snr = log_snr(t).exp()
    for p in ("eps", "x", "v"):
        xh, _ = pred_to_x_eps(pred, z, t, p)
        for w in ("snr", "truncated_snr", "snr+1", "constant"):
            want = loss_weight(snr, w) * (x - xh).pow(2).flatten(1).mean(1)
            got = diffusion_loss(pred, x, eps, t, p, w, reduce=False)
            assert torch.allclose(got, want, rtol=1e-3), (p, w)
    # perfect prediction: zero loss
    assert diffusion_loss(prediction_target(x, eps, t, "v"), x, eps, t).item() == pytest.approx(0.0, abs=1e-10)


def test_ddim_step_matches_diffusers_and_the_clean_end():
    ddim = DDIMScheduler(**scheduler_config("v"))
    ddim.set_timesteps(8)
    g = torch.Generator().manual_seed(3)
    z, v = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    for t in ddim.timesteps.tolist():
        x_hat = pred_to_x_eps(v, z, torch.tensor([t]), "v")[0]
        ours = ddim_step(x_hat, z, t, t - 128)
        assert torch.allclose(ours, ddim.step(v, t, z).prev_sample, atol=1e-4), t
    assert torch.allclose(ddim_step(x_hat, z, 127, -1), x_hat)  # s = -1 is alpha = 1: the clean sample


def test_bad_names_fail_with_allowed_values():
    x = torch.zeros(1, 1)
    with pytest.raises(ValueError, match=r"prediction_type='epsilon'.*\['eps', 'x', 'v'\]"):
        prediction_target(x, x, torch.tensor([0]), "epsilon")
    with pytest.raises(ValueError, match="weighting='mse'"):
        loss_weight(torch.ones(1), "mse")
