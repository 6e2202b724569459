import gzip
import struct

import numpy as np
import pytest

from ldm_paper import data
from ldm_paper.data import (FASHION_MNIST_CLASSES, DataNotFoundError, CaptionedImageFolder, caption_for,
                            fashion_mnist_dir, load_fashion_mnist)


def _write_idx(path, arr):
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes())


@pytest.fixture
def fake_fmnist(tmp_path, monkeypatch):
    """A tiny IDX dataset in the Fashion-MNIST layout, with known pixels."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 20)):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        imgs[:, 0, 0] = 255; imgs[:, 0, 1] = 0
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", imgs)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))
    monkeypatch.setenv("LDM_PAPER_FASHION_MNIST", str(tmp_path))
    return tmp_path


def test_loader_shapes_ranges_captions(fake_fmnist):
    ds = load_fashion_mnist("train")
    assert len(ds) == 30 and len(load_fashion_mnist("test")) == 20
    x = ds[3]
    assert x["image"].shape == (1, 32, 32) and x["label"] == 3 and x["caption"] == "a photo of a dress"
    assert x["image"].min().item() == -1.0 and x["image"].max().item() == 1.0
    assert (x["image"][0, :2].eq(-1)).all() and (x["image"][0, :, :2].eq(-1)).all()  # 2-pixel background padding
    assert x["image"][0, 2, 2].item() == 1.0 and x["image"][0, 2, 3].item() == -1.0  # pixel (0,0) -> (2,2)
    imgs, labels = ds.tensors()
    assert imgs.shape == (30, 1, 32, 32) and labels.tolist()[:3] == [0, 1, 2]
    assert load_fashion_mnist("train", channels=3)[0]["image"].shape == (3, 32, 32)


def test_captions():
    assert caption_for(9) == "a photo of an ankle boot" and caption_for(7) == "a photo of a sneaker"
    assert len(set(caption_for(i) for i in range(10))) == 10 and len(FASHION_MNIST_CLASSES) == 10


def test_subset_is_balanced_and_deterministic(fake_fmnist):
    ds = load_fashion_mnist("train")
    s = ds.subset(20, seed=1)
    assert np.bincount(s.labels, minlength=10).tolist() == [2] * 10
    assert np.array_equal(s.images, ds.subset(20, seed=1).images)
    assert not np.array_equal(s.images, ds.subset(20, seed=2).images)


def test_missing_data_error_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_PAPER_FASHION_MNIST", str(tmp_path))
    with pytest.raises(DataNotFoundError) as e:
        load_fashion_mnist("train")
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "LDM_PAPER_FASHION_MNIST" in msg and str(tmp_path) in msg


def test_bad_parameters(fake_fmnist):
    with pytest.raises(ValueError, match="split='valid'"):
        load_fashion_mnist("valid")
    with pytest.raises(ValueError, match="channels=2"):
        load_fashion_mnist(channels=2)


@pytest.mark.skipif(not data.DEBIAN_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv("LDM_PAPER_FASHION_MNIST", raising=False)
    assert fashion_mnist_dir() == data.DEBIAN_FASHION_MNIST
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    assert (len(train), len(test)) == (60000, 10000)
    assert np.bincount(test.labels).tolist() == [1000] * 10
    imgs, _ = test.subset(100).tensors()
    assert -1.0 <= imgs.min() < -0.99 and 0.99 < imgs.max() <= 1.0


def test_captioned_image_folder(tmp_path):
    from PIL import Image
    Image.fromarray(np.full((20, 30, 3), 255, np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "captions.jsonl").write_text('{"file": "a.png", "caption": "white"}\n')
    ds = CaptionedImageFolder(tmp_path, image_size=8)
    assert ds[0]["image"].shape == (3, 8, 8) and ds[0]["caption"] == "white"
    (tmp_path / "captions.jsonl").write_text('{"file": "missing.png", "caption": "x"}\n')
    with pytest.raises(DataNotFoundError, match="missing"):
        CaptionedImageFolder(tmp_path)
