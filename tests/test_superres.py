import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from ldm_paper.autoencoder import psnr
from ldm_paper.data import load_fashion_mnist, to_float, to_uint8
from ldm_paper.family import build_unet, get_scale
from ldm_paper.sampling import sample
from ldm_paper.superres import (Degradation, DegradationConfig, SPLIT_SEEDS, degrade, draw_degradation, feature_distance,
                                finetune_superres, sr_metrics, sr_unet_from_pretrained, ssim, superres_data,
                                superres_pairs, superres_sample)
from ldm_paper.train import TrainConfig, list_checkpoints, run_compute, synthetic_data, train


@pytest.fixture(scope="module")
def hr():
    return load_fashion_mnist("test").subset(40).tensors()[0]


def _unet(width=16, seed=0):
    torch.manual_seed(seed)
    return build_unet(get_scale("cpu").config(width)).eval()


# --- degradation ---

def test_degradation_is_deterministic_per_seed_and_batch_independent(hr):
    lr, params = degrade(hr, seed=3)
    assert lr.shape == (40, 1, 8, 8) and lr.dtype == torch.float32 and lr.min() >= -1 and lr.max() <= 1
    assert torch.equal(degrade(hr, seed=3)[0], lr)
    for lo, hi in [(5, 9), (17, 18), (0, 40)]:
        assert torch.equal(degrade(hr[lo:hi], seed=3, first_index=lo)[0], lr[lo:hi])
    assert not torch.equal(degrade(hr, seed=4)[0], lr)
    # quantised to 8-bit levels
    assert torch.equal(to_float(to_uint8(lr)), lr)


def test_degradation_parameters_are_recorded_and_reproduce_the_image(hr):
    cfg = DegradationConfig()
    lr, params = degrade(hr, seed=3, first_index=100, config=cfg)
    assert [d.index for d in params] == list(range(100, 140)) and {d.seed for d in params} == {3}
    assert all(isinstance(d, Degradation) for d in params)
    assert all(cfg.blur_sigma[0] <= d.blur_sigma <= cfg.blur_sigma[1] for d in params)
    assert all(cfg.noise_std[0] <= d.noise_std <= cfg.noise_std[1] for d in params)
    assert {d.downsample for d in params} == {"area", "bicubic"}
    assert len({round(d.blur_sigma, 6) for d in params}) == 40          # drawn per image
    # an independent reimplementation (scipy's Gaussian filter; area = 4x4 means) from the records gives the same LR
    from scipy.ndimage import gaussian_filter
    radius = math.ceil(3 * cfg.blur_sigma[1])
    checked = 0
    for i, d in enumerate(params):
        if d.downsample != "area": continue
        x = gaussian_filter(hr[i, 0].double().numpy(), d.blur_sigma, mode="mirror", radius=radius)
        x = x.reshape(8, 4, 8, 4).mean(axis=(1, 3))
        _, noise = draw_degradation(cfg, 3, d.index, (1, 8, 8))
        x = np.clip(x + d.noise_std * noise[0].numpy(), -1, 1)
        x = np.round((x + 1) * 127.5) / 127.5 - 1
        np.testing.assert_allclose(lr[i, 0].numpy(), x, atol=1e-6)
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("kwargs, images, message", [
    (dict(config=DegradationConfig(scale=2)), torch.zeros(2, 1, 32, 32), "scale=2"),
    (dict(config=DegradationConfig(scale=8)), torch.zeros(2, 1, 32, 32), "scale=8"),
    (dict(), torch.zeros(2, 1, 30, 30), "image size 30"),
    (dict(), torch.zeros(2, 1, 32, 34), "image size 34"),
])
def test_degradation_errors_name_the_parameter(kwargs, images, message):
    with pytest.raises(ValueError, match=message):
        degrade(images, **kwargs)


# --- the SR UNet ---

def test_zero_init_sr_unet_equals_the_pretrained_unet_exactly():
    unet = _unet(16)
    with torch.no_grad():        # a conv_in far from its init, so a wrong copy would show
        unet.conv_in.weight.normal_(generator=torch.Generator().manual_seed(1))
    sr = sr_unet_from_pretrained(unet).eval()
    assert sr.config.in_channels == 8 and sr.config.out_channels == 4
    sd, sd0 = sr.state_dict(), unet.state_dict()
    assert sd.keys() == sd0.keys()
    assert all(torch.equal(sd[k], sd0[k]) for k in sd if k != "conv_in.weight")
    assert torch.equal(sd["conv_in.weight"][:, :4], sd0["conv_in.weight"]) and not sd["conv_in.weight"][:, 4:].any()
    g = torch.Generator().manual_seed(0)
    z, ctx = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 8, 128, generator=g)
    t = torch.tensor([0, 400, 1023])
    with torch.no_grad():
        ref = unet(z, t, encoder_hidden_states=ctx).sample
        for _ in range(3):
            lr = 3 * torch.randn(3, 4, 8, 8, generator=g)
            assert torch.equal(sr(torch.cat([z, lr], 1), t, encoder_hidden_states=ctx).sample, ref)

def test_sr_unet_is_a_plain_diffusers_model(tmp_path):
    sr = sr_unet_from_pretrained(_unet(16))
    sr.save_pretrained(tmp_path / "sr")
    back = UNet2DConditionModel.from_pretrained(tmp_path / "sr")
    assert back.config.in_channels == 8
    assert all(torch.equal(a, b) for a, b in zip(sr.state_dict().values(), back.state_dict().values()))


def test_sampling_the_zero_init_model_is_sampling_the_pretrained_one():
    unet = _unet(16)
    sr = sr_unet_from_pretrained(unet).eval()
    g = torch.Generator().manual_seed(2)
    ctx, lr = torch.randn(5, 8, 128, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    a = superres_sample(sr, lr, ctx, steps=3, seed=7, batch_size=2)
    assert torch.allclose(a, sample(unet, ctx, steps=3, seed=7), atol=1e-5)
    # per-image seeds: batch size and position do not matter
    assert torch.allclose(a[3:4], superres_sample(sr, lr[3:4], ctx[3:4], steps=3, seed=7, first_index=3), atol=1e-5)
    # once the LR channels have weight, the LR latent changes the sample
    with torch.no_grad(): sr.conv_in.weight[:, 4:].normal_(generator=g)
    b = superres_sample(sr, lr, ctx, steps=3, seed=7)
    assert not torch.allclose(b, superres_sample(sr, -lr, ctx, steps=3, seed=7), atol=1e-3)


def test_training_with_concat_latents_moves_the_new_channels(tmp_path):
    init = tmp_path / "init"
    sr_unet_from_pretrained(_unet(16)).save_pretrained(init)
    data = synthetic_data(32)
    data = type(data)(data.latents, data.caption_index, data.context_table, data.null_index, data.fingerprint,
                      concat_latents=torch.randn(32, 4, 8, 8, generator=torch.Generator().manual_seed(3)))
    cfg = TrainConfig(width=16, steps=1, batch_size=8, warmup_steps=0, save_every=10, log_every=1, init_from=str(init))
    out = train(cfg, data, tmp_path / "run", progress=False)
    w = UNet2DConditionModel.from_pretrained(out / "unet_ema").conv_in.weight       # EMA = model after one step
    assert w[:, 4:].abs().min() > 0          # every new weight got a gradient (Adam moves each by about lr)
    assert json.loads((out / "config.json").read_text())["unet"]["in_channels"] == 8


# --- data, fine-tuning and resume on the ci preset ---

def test_superres_pairs_and_data_on_ci():
    pairs = superres_pairs("ci", "test", progress=False)
    assert pairs.lr.shape == (256, 1, 8, 8) and pairs.lr_latents.shape == (256, 4, 8, 8) and len(pairs.captions) == 256
    assert torch.equal(pairs.lr[:16], degrade(pairs.hr[:16], seed=SPLIT_SEEDS["test"])[0])    # the cache = degrade
    assert pairs.degradations[7] == degrade(pairs.hr[7:8], seed=SPLIT_SEEDS["test"], first_index=7)[1][0]
    data = superres_data("ci", progress=False)
    assert data.concat_latents.shape == data.latents.shape == (512, 4, 8, 8)
    assert "+concat" in data.run_fingerprint
    with pytest.raises(ValueError, match="split='val'"):
        superres_pairs("ci", "val")


def test_finetune_on_ci_runs_and_resumes_exactly(tmp_path):
    with pytest.raises(ValueError, match="width=24 is not fine-tuned"):
        finetune_superres("ci", 24, out_dir=tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
    a = finetune_superres("ci", 16, out_dir=tmp_path / "a", progress=False)
    b = finetune_superres("ci", 16, out_dir=tmp_path / "b", progress=False, stop_after=4)
    assert not (b / "done.json").exists()
    b = finetune_superres("ci", 16, out_dir=tmp_path / "b", progress=False)
    wa = UNet2DConditionModel.from_pretrained(a / "unet_ema").state_dict()
    wb = UNet2DConditionModel.from_pretrained(b / "unet_ema").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    rec = json.loads((a / "config.json").read_text())
    assert rec["unet"]["in_channels"] == 8 and rec["train"]["init_from"] == str(a / "init")
    assert rec["train"]["steps"] == 10 and rec["train"]["seed"] == 1
    # the milestone (half of the fine-tune) is saved at step 5, at fine-tuning compute 5 x GFLOPs of the SR UNet
    cps = list_checkpoints(a)
    assert [c["step"] for c in cps] == [5]
    assert cps[0]["train_compute"] == pytest.approx(5 * rec["forward_gflops"])
    # fine-tuning changed the model, including the LR channels
    init = UNet2DConditionModel.from_pretrained(a / "init").state_dict()
    assert wa["conv_in.weight"][:, 4:].abs().sum() > 0 and not torch.equal(wa["conv_in.weight"], init["conv_in.weight"])


# --- metrics ---

def test_ssim_and_psnr_known_values(hr):
    assert torch.allclose(ssim(hr, hr), torch.ones(len(hr)), atol=1e-6)
    a, b = torch.full((2, 1, 16, 16), -0.2), torch.full((2, 1, 16, 16), 0.4)     # flat: only the luminance term
    mu_a, mu_b = 0.4, 0.7
    expect = (2 * mu_a * mu_b + 1e-4) / (mu_a ** 2 + mu_b ** 2 + 1e-4)
    assert torch.allclose(ssim(a, b), torch.full((2,), expect), atol=1e-6)
    noise = 0.1 * torch.randn(hr.shape, generator=torch.Generator().manual_seed(0))
    mse = noise.pow(2).flatten(1).mean(1)
    assert torch.allclose(psnr(hr, hr + noise), 10 * torch.log10(4 / mse), atol=1e-4)
    s1, s2 = ssim(hr, hr + noise).mean(), ssim(hr, hr + 3 * noise).mean()
    assert 0 < s2 < s1 < 1
    with pytest.raises(ValueError, match="window=13"):
        ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), window=13)


def test_feature_distance_takes_any_feature_callable(hr):
    flat = lambda x: x.flatten(1)
    assert torch.allclose(feature_distance(hr, hr, flat), torch.zeros(len(hr)), atol=1e-6)
    assert torch.allclose(feature_distance(hr, 2 * hr, flat), torch.zeros(len(hr)), atol=1e-6)   # scale-free
    x, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    assert feature_distance(x, y, lambda v: v).item() == pytest.approx(2 - 2 * math.cos(math.pi / 4))
    assert feature_distance(x, -x, lambda v: v).item() == pytest.approx(4.0)
    m = sr_metrics(hr, hr, features=flat)
    assert m["n"] == 40 and m["ssim"] == pytest.approx(1.0) and m["feature_distance"] == pytest.approx(0, abs=1e-6)
    assert "feature_distance" not in sr_metrics(hr, hr)
