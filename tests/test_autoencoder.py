import math

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from ldm_paper import autoencoder as A
from ldm_paper.autoencoder import (ae_config, decode, encode, encode_dataset, latent_scale_factor, latent_shape,
                                   latents_cache_path, load_vae, preset_autoencoder, psnr, reconstruction_psnr,
                                   train_autoencoder, weights_fingerprint)
from ldm_paper.core import read_json
from ldm_paper.data import CaptionedImages

TINY = ae_config(block_out_channels=(8, 16, 16))        # f = 4, 8 GroupNorm groups: trains in milliseconds per step
FAST = dict(batch_size=8, config=TINY, warmup=2, progress=False)


@pytest.fixture
def data():
    """64 smooth synthetic 32x32 images (blobs of random size and place), 10 labels: no dataset needed."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    imgs = []
    for _ in range(64):
        cy, cx, r = rng.uniform(8, 24), rng.uniform(8, 24), rng.uniform(3, 9)
        imgs.append(255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r ** 2)))
    labels = np.arange(64) % 10
    return CaptionedImages(np.stack(imgs)[:, None].round().astype(np.uint8), labels, [f"c{l}" for l in labels])


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_PAPER_CACHE", str(tmp_path / "cache"))


def _weights(ae): return {k: v.clone() for k, v in ae.state_dict().items()}

def _same(a, b): return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_shapes_32x32x1_to_8x8x4_and_back():
    cfg = ae_config()
    assert latent_shape(cfg) == (4, 8, 8) and cfg["in_channels"] == cfg["out_channels"] == 1
    assert latent_shape(ae_config(block_out_channels=(128, 256, 512, 512), image_size=64)) == (4, 8, 8)   # f = 8
    ae = AutoencoderKL(**cfg).eval()
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    z = encode(ae, x)
    assert z.shape == (3, 4, 8, 8) and z.dtype == torch.float32
    y = decode(ae, z)
    assert y.shape == (3, 1, 32, 32) and y.min() >= -1 and y.max() <= 1


def test_resume_after_interrupt_gives_the_same_weights(tmp_path, data, monkeypatch):
    ref = _weights(train_autoencoder(tmp_path / "ref", steps=6, save_every=2, dataset=data, **FAST))

    # interrupted run: killed while drawing the batch of step index 4 (after the checkpoint at step 4)
    real = A._batch_indices
    def crash(n, b, g, calls=[]):
        calls.append(1)
        if len(calls) == 5: raise KeyboardInterrupt
        return real(n, b, g)
    monkeypatch.setattr(A, "_batch_indices", crash)
    with pytest.raises(KeyboardInterrupt):
        train_autoencoder(tmp_path / "run", steps=6, save_every=2, dataset=data, **FAST)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint-0000004"]   # no model, no partial files

    # the second call resumes from step 4: it trains exactly 2 steps and ends on the reference weights
    done = []
    monkeypatch.setattr(A, "_batch_indices", lambda n, b, g: done.append(1) or real(n, b, g))
    ae = train_autoencoder(tmp_path / "run", steps=6, save_every=2, dataset=data, **FAST)
    assert len(done) == 2 and read_json(tmp_path / "run" / "train_record.json")["resumed_from"] == 4
    assert _same(_weights(ae), ref) and not ae.training
    assert len(read_json(tmp_path / "run" / "train_record.json")["history"]) == 6

    # extending a finished 4-step run to 6 steps is the same resume
    monkeypatch.setattr(A, "_batch_indices", real)
    train_autoencoder(tmp_path / "ext", steps=4, save_every=3, dataset=data, **FAST)
    assert _same(_weights(train_autoencoder(tmp_path / "ext", steps=6, save_every=3, dataset=data, **FAST)), ref)

    # and the comparison is not vacuous: another seed gives other weights
    other = train_autoencoder(tmp_path / "seed1", steps=6, save_every=2, dataset=data, seed=1, **FAST)
    assert not _same(_weights(other), ref)


def test_finished_run_is_loaded_not_retrained(tmp_path, data, monkeypatch):
    ae = train_autoencoder(tmp_path / "r", steps=3, save_every=None, dataset=data, **FAST)
    monkeypatch.setattr(A, "_batch_indices", lambda *a: pytest.fail("a finished run was trained again"))
    again = train_autoencoder(tmp_path / "r", steps=3, save_every=None, dataset=data, **FAST)
    assert _same(_weights(again), _weights(ae)) and not again.training
    assert again.config.scaling_factor == ae.config.scaling_factor


def test_scaling_factor_gives_unit_std_latents_and_is_saved(tmp_path, data):
    ae = train_autoencoder(tmp_path / "r", steps=4, dataset=data, scale_images=len(data), **FAST)
    s = ae.config.scaling_factor
    assert s != 0.18215 and abs(s - latent_scale_factor(ae, data)) < 1e-6 * s
    z = encode(ae, data)
    assert abs(z.std().item() - 1.0) < 1e-5
    assert abs(encode(ae, data, batch_size=5).std().item() - 1.0) < 1e-5       # batching does not matter
    assert load_vae(tmp_path / "r" / "model").config.scaling_factor == s         # loaders get it back
    # decode inverts the scaling: decoding scaled latents = decoding the raw posterior means
    x = A._gather(data, torch.arange(4))
    with torch.no_grad(): raw = ae.decode(ae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    assert torch.allclose(decode(ae, encode(ae, x)), raw, atol=1e-5)


def test_encode_dataset_cache_hit_skips_encoding(tmp_path, data, monkeypatch):
    ae = AutoencoderKL(**TINY).eval()
    calls = []
    real = A.encode
    monkeypatch.setattr(A, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    z1, y1 = encode_dataset(ae, data, "blobs")
    assert len(calls) == 1 and z1.shape == (64, 4, 8, 8) and y1.tolist() == data.labels.tolist()
    path = latents_cache_path(ae, data, "blobs")
    assert path.is_file() and path.suffix == ".safetensors" and str(tmp_path / "cache" / "latents") in str(path)
    z2, y2 = encode_dataset(ae, data, "blobs")
    assert len(calls) == 1 and torch.equal(z1, z2) and torch.equal(y1, y2)     # read from the cache
    # other weights, another name or other images: another key
    other = AutoencoderKL(**TINY)
    with torch.no_grad(): next(other.parameters()).add_(1.0)
    assert weights_fingerprint(other) != weights_fingerprint(ae)
    assert latents_cache_path(other, data, "blobs") != path and latents_cache_path(ae, data, "x") != path
    assert latents_cache_path(ae, data.subset(10), "blobs") != path
    encode_dataset(other, data, "blobs")
    assert len(calls) == 2


def test_psnr_values(data):
    x = torch.zeros(2, 1, 8, 8)
    assert torch.allclose(psnr(x, x + 0.1), torch.full((2,), 20 * math.log10(1 / 0.05)), atol=1e-4)   # 26.02 dB
    assert torch.allclose(psnr(x - 1, x + 1), torch.zeros(2))                                       # black vs white: 0 dB
    ae = AutoencoderKL(**TINY).eval()
    p = reconstruction_psnr(ae, data)
    x = A._gather(data, torch.arange(len(data)))
    assert abs(p - psnr(decode(ae, encode(ae, x)), x).mean().item()) < 1e-4


def test_load_vae_round_trip_and_missing_path(tmp_path):
    ae = AutoencoderKL(**TINY)
    ae.register_to_config(scaling_factor=0.5)
    ae.save_pretrained(tmp_path / "sd" / "vae")        # the layout of an SD pipeline folder
    for p in (tmp_path / "sd" / "vae", tmp_path / "sd"):
        vae = load_vae(p)
        assert _same(_weights(vae), _weights(ae)) and vae.config.scaling_factor == 0.5 and not vae.training
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_vae(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_vae(tmp_path / "empty")


@pytest.mark.parametrize("kwargs, name", [
    (dict(image_size=30), "image_size=30"), (dict(latent_channels=0), "latent_channels"),
    (dict(block_out_channels=()), "block_out_channels"), (dict(layers_per_block=-1), "layers_per_block"),
    (dict(block_out_channels=(32, 48), norm_num_groups=32), "norm_num_groups=32")])
def test_ae_config_errors_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name): ae_config(**kwargs)


@pytest.mark.parametrize("kwargs, name", [
    (dict(loss="l2"), "loss='l2'"), (dict(steps=0), "steps"), (dict(batch_size=-1), "batch_size"),
    (dict(save_every=0), "save_every"), (dict(lr=0.0), "lr"), (dict(seed=-1), "seed"), (dict(kl_weight=-1.0), "kl_weight")])
def test_train_errors_name_the_parameter(tmp_path, kwargs, name):
    args = dict(steps=2, loss="l1", **FAST) | kwargs
    with pytest.raises(ValueError, match=name): train_autoencoder(tmp_path / "r", **args)


def test_other_settings_in_the_same_out_dir_are_refused(tmp_path, data):
    train_autoencoder(tmp_path / "r", steps=2, dataset=data, **FAST)
    with pytest.raises(ValueError, match=r"lr=0.001 there, 0.002 here"):
        train_autoencoder(tmp_path / "r", steps=2, dataset=data, lr=2e-3, **FAST)
    with pytest.raises(ValueError, match="steps=1.*step 2"):
        train_autoencoder(tmp_path / "r", steps=1, dataset=data, **FAST)
    with pytest.raises(ValueError, match="preset='big'"):
        preset_autoencoder("big")
