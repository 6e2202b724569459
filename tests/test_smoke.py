"""The paper preset's code path at toy size: the smoke assets load through the real loaders, and every manifest entry
runs end to end at `paper-smoke` (folder -> latent shards under 2 processes -> training under 2 processes ->
distillation, SR, every figure; Inception / FD-CLIP / CLIP-score evaluation) and writes its outputs and FINDINGS."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm_paper.smoke import write_smoke_assets, smoke_items, SMOKE_COLORS, SMOKE_SHAPES
from ldm_paper.reproduce import load_manifest, findings_report_path

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_smoke_assets(tmp_path_factory.mktemp("smoke") / "assets")


def test_smoke_assets_load_through_the_real_loaders(assets):
    from diffusers import AutoencoderKL
    from transformers import CLIPModel
    from ldm_paper.data import CaptionedImageFolder
    from ldm_paper.shards import ShardSource
    from ldm_paper.text import load_clip_text_encoder
    from ldm_paper.metrics import inception_extractor, inception_features, clip_scores
    train = CaptionedImageFolder(assets["LDM_PAPER_DATA"], 64)
    assert len(train) == 96 and train.captions[:2] == ["a red square", "a green square"]
    x = torch.stack([train[i]["image"] for i in range(4)])
    z = AutoencoderKL.from_pretrained(assets["LDM_PAPER_VAE"]).encode(x).latent_dist.mean
    assert z.shape == (4, 4, 8, 8)                                     # the cpu family's latents, from an SD-style VAE
    assert load_clip_text_encoder(assets["LDM_PAPER_CLIP_TEXT"]).encode(["a blue circle"]).shape == (1, 8, 128)
    f = inception_features(inception_extractor(assets["LDM_PAPER_INCEPTION"]), x)
    assert f.shape == (4, 2048) and np.isfinite(f).all() and not np.allclose(f[0], f[1])
    s = clip_scores(x, train.captions[:4], assets["LDM_PAPER_CLIP"])
    assert s.shape == (4,) and ((0 <= s) & (s <= 100)).all()
    assert CLIPModel.from_pretrained(assets["LDM_PAPER_CLIP"]).config.projection_dim == 16
    web = ShardSource("webdataset", Path(assets["LDM_PAPER_DATA"]).parent / "webdataset", 64, block_size=32)
    assert len(smoke_items(12)) == 12 and len({c for *_, c in smoke_items(12)}) == len(SMOKE_COLORS) * len(SMOKE_SHAPES)
    assert web is not None
    # a second call finds the finished assets and writes nothing
    mtime = (Path(assets["LDM_PAPER_VAE"]) / "config.json").stat().st_mtime_ns
    assert write_smoke_assets(Path(assets["LDM_PAPER_DATA"]).parent) == assets
    assert (Path(assets["LDM_PAPER_VAE"]) / "config.json").stat().st_mtime_ns == mtime


def test_every_manifest_entry_runs_at_paper_smoke(assets, tmp_path):
    env = {**os.environ, **assets, "LDM_PAPER_CACHE": str(tmp_path / "cache"), "OMP_WAIT_POLICY": "PASSIVE"}
    cli = [str(Path(sys.executable).parent / "ldm-paper"), "reproduce", "--preset", "paper-smoke", "--runs-dir", str(tmp_path / "runs"),
           "--workers", "2", "--reuse-kernels"]   # two entries side by side, as a 2-core user would run it; a kernel each
    r = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=2400, cwd=ROOT)
    log = r.stdout + r.stderr
    print(log[-4000:])
    m = load_manifest()
    n = len(m.entries)
    assert r.returncode == 0 and f"{n} of {n} entries ran" in log, log[-6000:]
    missing = [o for e in m.entries.values() for o in e.outputs_for("paper-smoke") if not (ROOT / o).exists()]
    assert not missing, missing
    import json
    done = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "train").glob("cpu-c*/done.json")]
    assert sum(d.get("processes") == 2 for d in done) >= 2, done   # the family's widths trained under a 2-process launch
    for method in ("distill", "consistency"):                          # both distillations too
        configs = [json.loads(p.read_text()) for p in (tmp_path / "cache" / method).glob("*/config.json")]
        assert configs and all(c.get("processes") == 2 for c in configs), (method, configs)
    findings = findings_report_path("paper-smoke").read_text()
    assert "paper-smoke" in findings
    again = subprocess.run(cli + ["--dry-run"], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert again.returncode == 0 and "to run: 0" in again.stdout, again.stdout[-3000:]   # every entry done: nothing redone
