"""Metrics: FID through clean-fid with the project's evaluation network, agreement, Inception from a local file."""
import numpy as np
import pytest
import torch

from ldm_paper.metrics import (EvalNet, FeatureExtractor, FIDStats, fid_score, image_features, folder_features,
                               class_agreement, inception_extractor, inception_features, train_eval_net,
                               classifier_accuracy, sanity_numbers, preset_eval_net, reference_stats, clip_score,
                               clip_image_features, fid_with_spread, eval_protocol, eval_net_info, N_BOOT, SPREAD_Z)


def test_fid_matches_closed_form_for_gaussians():
    """FID of two Gaussians with known moments: |mu1-mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) = 4*d + d*(1 + 4 - 2*2)."""
    rng = np.random.default_rng(0)
    d, n = 4, 200_000
    a = rng.normal(0, 1, (n, d)); b = rng.normal(2, 2, (n, d))
    assert fid_score(a, b) == pytest.approx(d * 4 + d * 1, rel=0.02)
    assert fid_score(a, a) == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("which", ["a", "b"])
def test_fid_sanity_numbers_on_real_data(which):
    """Both ci networks: real sets are close, noise is far, and a blurred test half is clearly farther than the other
    half (noise of std 0.1 is only checked at the `cpu` preset: the ci networks, trained for seconds, barely see it)."""
    s = sanity_numbers("ci", which=which)
    assert s["fid_test_halves"] < 5.0 and s["fid_train_vs_test"] < 5.0
    assert s["fid_noise_vs_test"] > 5 * max(s["fid_test_halves"], s["fid_train_vs_test"])
    assert s["fid_blur"] > 2 * s["fid_test_halves"]
    assert s["fid_noise_0.1"] >= 0 and s["classifier_test_accuracy"] > 0.4      # chance is 0.1


def test_two_evaluation_networks_differ():
    a, b = preset_eval_net("ci", "a", progress=False), preset_eval_net("ci", "b", progress=False)
    assert (a.config.arch, b.config.arch) == ("plain", "residual")
    assert FeatureExtractor(a).name != FeatureExtractor(b).name
    assert eval_net_info("ci", "a")["seed"] != eval_net_info("ci", "b")["seed"]
    with pytest.raises(ValueError, match="which='c'"): preset_eval_net("ci", "c")
    with pytest.raises(ValueError, match="arch='vgg'"): EvalNet(arch="vgg")
    proto = eval_protocol("ci")
    assert [k for k, *_ in proto.nets] == ["fid", "fid_b"] and proto.name == FeatureExtractor(a).name
    assert proto.nets[1][1] == FeatureExtractor(b).name
    assert reference_stats("ci", which="b").mu.shape == (b.config.feature_dim,)


def _gaussian_feats(rng, n, d=32, shift=0.0):
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ (np.eye(d) + mix) + shift


def test_fid_with_spread_fast_distance_matches_clean_fid():
    rng = np.random.default_rng(0)
    ref = FIDStats.of(_gaussian_feats(rng, 4000))
    for n in (20, 300):                                   # fewer and more images than feature dimensions
        f = _gaussian_feats(rng, n, shift=0.2)
        s = fid_with_spread(f, ref, n_boot=5)
        assert s["fid"] == pytest.approx(fid_score(f, ref), rel=1e-6)
        assert s["lo"] == pytest.approx(s["fid"] - SPREAD_Z * s["sd"]) and s["hi"] == pytest.approx(s["fid"] + SPREAD_Z * s["sd"])
        assert s["n_boot"] == 5
    with pytest.raises(ValueError, match="n_boot"): fid_with_spread(f, ref, n_boot=1)


def test_fid_with_spread_is_deterministic_and_shrinks_like_one_over_sqrt_n():
    rng = np.random.default_rng(1)
    ref = FIDStats.of(_gaussian_feats(rng, 8000))
    f = _gaussian_feats(rng, 2000, shift=0.1)
    small, large = fid_with_spread(f[:500], ref), fid_with_spread(f, ref)
    assert small["n_boot"] == N_BOOT and small["sd"] > 0 and large["sd"] > 0
    assert 1.5 < small["sd"] / large["sd"] < 2.7                # 4x the images: about half the sd
    assert fid_with_spread(f[:500], ref, seed=0) == small
    assert fid_with_spread(f[:500], ref, seed=1)["sd"] != small["sd"]


def test_features_same_through_batch_and_folder_paths(tmp_path):
    """clean-fid's folder path (PNG files, no resize) and its batch path give the same features."""
    from PIL import Image
    net = EvalNet(width=8, feature_dim=8).eval(); ex = FeatureExtractor(net)
    imgs = torch.randint(0, 256, (6, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for i, im in enumerate(imgs): Image.fromarray(im[0].numpy()).save(tmp_path / f"{i}.png")
    a = image_features(ex, imgs); b = folder_features(ex, tmp_path)
    assert np.allclose(a, b, atol=1e-5)


def test_agreement_is_classifier_accuracy_on_prompted_class():
    net = EvalNet(width=8, feature_dim=8).eval()
    x = torch.rand(20, 1, 32, 32) * 2 - 1
    pred = net(x).argmax(1)
    assert class_agreement(net, x, pred) == 1.0
    assert class_agreement(net, x, (pred + 1) % 10) == 0.0


def test_classifier_learns_separable_data():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (256,), generator=g)
    x = torch.where(y[:, None, None, None] == 1, 0.8, -0.8) + 0.3 * torch.randn(256, 1, 32, 32, generator=g)
    net = train_eval_net(x, y, steps=30, batch_size=32, width=8, feature_dim=8, progress=False)
    assert classifier_accuracy(net, x, y) > 0.95


def test_reference_stats_cached_and_stable():
    a = reference_stats("ci"); b = reference_stats("ci")
    assert a.n == 256 and np.array_equal(a.mu, b.mu)


def test_stats_roundtrip(tmp_path):
    s = FIDStats.of(np.random.default_rng(0).normal(size=(10, 3)))
    t = FIDStats.load(s.save(tmp_path / "s.npz"))
    assert t.n == 10 and np.allclose(s.sigma, t.sigma)


def test_inception_path_uses_a_local_file_and_never_downloads(tmp_path, monkeypatch):
    """A stand-in torchscript network with Inception's interface (layers: 299x299 -> 2048) saved under the real name."""
    import urllib.request
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("tried to download"))

    class Fake(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Conv2d(3, 2048, 1))
        def forward(self, x): return self.layers(x)
    torch.jit.script(Fake()).save(str(tmp_path / "inception-2015-12-05.pt"))
    ex = inception_extractor(tmp_path)
    f = inception_features(ex, torch.zeros(3, 1, 32, 32))
    assert f.shape == (3, 2048)
    with pytest.raises(FileNotFoundError, match="path="):
        inception_extractor(tmp_path / "missing")


def test_clip_score_with_a_tiny_local_clip(tmp_path):
    from transformers import CLIPConfig, CLIPModel
    from ldm_paper.text import save_tiny_clip
    save_tiny_clip(tmp_path)                                   # tokenizer (+ a text model we replace)
    cfg = CLIPConfig(text_config=dict(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                        image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0); CLIPModel(cfg).save_pretrained(tmp_path)
    imgs = torch.rand(4, 1, 32, 32) * 2 - 1
    s = clip_score(imgs, ["a photo of a bag"] * 4, tmp_path)
    assert 0 <= s <= 100
    assert clip_score(imgs, ["a photo of a bag"] * 4, tmp_path) == s      # deterministic
    f = clip_image_features(imgs, tmp_path, batch_size=3)                  # FD-CLIP's features: projected embeddings
    assert f.shape == (4, 16) and np.allclose(f, clip_image_features(imgs, CLIPModel.from_pretrained(tmp_path)), atol=1e-5)
