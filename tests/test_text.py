"""The frozen caption encoder, caption dropping for classifier-free guidance, the embedding table, the CLIP loader."""
import builtins
import json
import string
import sys

import pytest
import torch

from ldm_paper.data import FASHION_MNIST_CLASSES, caption_for
from ldm_paper.family import SCALES
from ldm_paper.text import (BOS, PAD, UNK, CaptionEncoder, build_vocab, caption_embedding_table, drop_captions,
                            fashion_mnist_captions, load_clip_text_encoder, save_tiny_clip)

CLASS_CAPTIONS = [caption_for(k) for k in range(len(FASHION_MNIST_CLASSES))]


@pytest.fixture(scope="module")
def enc():
    return CaptionEncoder()


def test_shapes_match_the_cpu_family_context(enc):
    h = enc.encode(CLASS_CAPTIONS + [""])
    assert h.shape == (11, SCALES["cpu"].tokens, SCALES["cpu"].context_dim) == (11, 8, 128)
    assert h.dtype == torch.float32 and torch.isfinite(h).all()
    # LayerNorm without affine: every token vector has mean 0 and unit (biased) std over its 128 entries
    assert torch.allclose(h.mean(-1), torch.zeros(11, 8), atol=1e-5)
    assert torch.allclose(h.std(-1, unbiased=False), torch.ones(11, 8), atol=1e-4)
    assert enc.encode("a photo of a bag").shape == (1, 8, 128)       # a single string is one caption, not characters


def test_frozen_and_deterministic(enc):
    assert sum(p.numel() for p in enc.parameters()) > 0
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.training
    torch.manual_seed(123)   # the global RNG must not matter: the weights come from the encoder's own seed
    other = CaptionEncoder()
    assert torch.equal(other.encode(CLASS_CAPTIONS), enc.encode(CLASS_CAPTIONS))
    assert not torch.equal(CaptionEncoder(seed=1).encode(CLASS_CAPTIONS), enc.encode(CLASS_CAPTIONS))


def test_save_pretrained_round_trip(enc, tmp_path):
    enc.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["vocab"] == build_vocab(CLASS_CAPTIONS) and cfg["max_tokens"] == 8 and cfg["dim"] == 128
    loaded = CaptionEncoder.from_pretrained(tmp_path)
    assert torch.equal(loaded.encode(CLASS_CAPTIONS + ["", "a zebra"]), enc.encode(CLASS_CAPTIONS + ["", "a zebra"]))
    assert sum(p.numel() for p in loaded.parameters() if p.requires_grad) == 0 and not loaded.training


def test_empty_caption_differs_from_every_class(enc):
    null, classes = enc.encode(""), enc.encode(CLASS_CAPTIONS)
    assert enc.tokenize("").tolist() == [[BOS] + [PAD] * 7]
    for k in range(10):
        assert (null[0] - classes[k]).abs().max() > 0.5, FASHION_MNIST_CLASSES[k]
    pooled = torch.nn.functional.normalize(torch.cat([classes, null]).mean(1), dim=-1)
    cos = pooled @ pooled.T
    assert cos[10, :10].max() < 0.8 and (cos[:10, :10] - torch.eye(10)).max() < 0.999   # all 11 distinct


def test_vocab_unknown_words_and_truncation(enc):
    vocab = build_vocab()
    assert vocab[:3] == ["<pad>", "<bos>", "<unk>"] and {"sneaker", "ankle", "boot", "t", "shirt"} <= set(vocab)
    assert fashion_mnist_captions() == CLASS_CAPTIONS
    ids = enc.tokenize(["A photo of a ZEBRA!", "a photo of a t-shirt"])
    w = enc.word_ids
    assert ids[0].tolist() == [BOS, w["a"], w["photo"], w["of"], w["a"], UNK, PAD, PAD]
    assert ids[1].tolist() == [BOS, w["a"], w["photo"], w["of"], w["a"], w["t"], w["shirt"], PAD]
    long = " ".join(["bag", "coat"] * 10)
    ids = enc.tokenize(long)
    assert ids.shape == (1, 8) and ids[0].tolist() == [BOS] + [w["bag"], w["coat"]] * 3 + [w["bag"]]
    assert torch.equal(enc.encode(long), enc.encode(" ".join(["bag", "coat"] * 4)))   # words past the limit are cut


def test_drop_captions_rate_and_determinism():
    caps = [caption_for(i % 10) for i in range(10_000)]
    for p in (0.1, 0.5):
        out = drop_captions(caps, p, torch.Generator().manual_seed(0))
        rate = sum(c == "" for c in out) / len(caps)
        assert abs(rate - p) < 0.02, (p, rate)                     # binomial sd <= 0.005 at n = 10k
        assert all(o in ("", c) for o, c in zip(out, caps))        # only ever replaced by "", never shuffled
    a = drop_captions(caps, 0.1, torch.Generator().manual_seed(7))
    assert a == drop_captions(caps, 0.1, torch.Generator().manual_seed(7))
    assert a != drop_captions(caps, 0.1, torch.Generator().manual_seed(8))
    assert drop_captions(caps[:20], 0.0) == caps[:20] and drop_captions(caps[:20], 1.0) == [""] * 20
    for bad in (1.5, -0.1, "0.1"):
        with pytest.raises(ValueError, match=r"\bp\b.*\[0, 1\]"):
            drop_captions(caps, bad)


def test_embedding_table_lookup_equals_encoding(enc):
    caps = [caption_for(i % 10) for i in range(500)]
    caps = drop_captions(caps, 0.2, torch.Generator().manual_seed(0))
    table = caption_embedding_table(enc, caps, batch_size=4)
    assert table.captions[0] == "" and len(table.captions) == 11 and table.embeddings.shape == (11, 8, 128)
    assert torch.equal(table.lookup(caps), enc.encode(caps))
    assert torch.equal(table.index([""]), torch.tensor([0]))
    with pytest.raises(KeyError, match="zebra"):
        table.index(["a photo of a zebra"])


# ---- CLIP loader: a tiny CLIP text model built here, saved locally; no network ---------------------------------------

def _write_tiny_clip(path):
    """A hand-written byte-level BPE vocabulary (letters, a few whole words) and a 2-layer CLIP text model."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
    letters = string.ascii_lowercase
    vocab = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters), "ph", "pho", "phot", "photo</w>"]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (path / "merges.txt").write_text("#version: 0.2\np h\nph o\npho t\nphot o</w>\n")
    tok = transformers.CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=12)
    cfg = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=12, bos_token_id=0, eos_token_id=1,
                                      pad_token_id=1)
    torch.manual_seed(0)
    model = transformers.CLIPTextModel(cfg).eval()
    tok.save_pretrained(path); model.save_pretrained(path)
    return tok, model


def test_clip_loader_on_a_tiny_local_model(tmp_path):
    tok, model = _write_tiny_clip(tmp_path)
    clip = load_clip_text_encoder(tmp_path)
    caps = ["a photo of a bag", "", "a " * 30]
    h = clip.encode(caps)
    assert h.shape == (3, 12, 16) and clip.max_tokens == 12 and clip.dim == 16
    # exactly SD's conditioning: ids padded to the tokenizer's max length, the text model's last hidden state
    ids = tok(caps, padding="max_length", max_length=12, truncation=True, return_tensors="pt").input_ids
    assert ids[0, :3].tolist() == [0, tok.convert_tokens_to_ids("a</w>"), tok.convert_tokens_to_ids("photo</w>")]
    with torch.no_grad():
        assert torch.allclose(h, model(ids).last_hidden_state, atol=1e-6)
    assert not torch.allclose(h[0], h[1])
    assert not any(p.requires_grad for p in clip.text_model.parameters())
    table = caption_embedding_table(clip, ["a photo of a bag", "a photo of a bag"])
    assert table.embeddings.shape == (2, 12, 16) and torch.allclose(table.lookup([""])[0], h[1], atol=1e-6)


def test_clip_loader_reads_an_sd_pipeline_layout(tmp_path):
    pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
    save_tiny_clip(tmp_path / "text_encoder"); save_tiny_clip(tmp_path / "tokenizer")
    a = load_clip_text_encoder(tmp_path).encode(CLASS_CAPTIONS)
    b = load_clip_text_encoder(tmp_path / "text_encoder").encode(CLASS_CAPTIONS)
    assert a.shape == (10, 16, 32) and torch.equal(a, b)


def test_clip_loader_fails_clearly(tmp_path, monkeypatch):
    missing = tmp_path / "no-clip-here"
    with pytest.raises(FileNotFoundError, match="no-clip-here"):
        load_clip_text_encoder(missing)
    (tmp_path / "config.json").write_text("{}")
    real_import = builtins.__import__
    def no_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."): raise ImportError("No module named 'transformers'")
        return real_import(name, *args, **kwargs)
    monkeypatch.delitem(sys.modules, "transformers", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(ImportError, match="pip install transformers"):
        load_clip_text_encoder(tmp_path)
