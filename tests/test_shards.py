"""Latent shards: inputs (folder, COCO, webdataset tars) encoded by 2 processes like 1, resumable encoding, training
from shards under 2 processes that resumes bit for bit after a kill, and memory that does not grow with the shards."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image

from ldm_paper.autoencoder import ae_config
from ldm_paper.shards import LatentShards, ShardSource, encode_shards, write_block, write_index
from ldm_paper.train import launch_command

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CFG = dict(steps=6, batch_size=8, warmup_steps=2, save_every=2, log_every=2)

RUNNER = textwrap.dedent("""
    import sys, json
    from pathlib import Path
    from accelerate import Accelerator
    from diffusers import AutoencoderKL
    from ldm_paper.shards import ShardSource, encode_shards, shard_train_data
    from ldm_paper.text import CaptionEncoder
    from ldm_paper.train import TrainConfig, train
    a = json.loads(sys.argv[1])
    acc = Accelerator(cpu=True)
    if a["job"] == "encode":
        src = ShardSource(a["format"], a["root"], 32, block_size=4)
        encode_shards(src, AutoencoderKL.from_pretrained(a["vae"]), a["out"], acc, batch_size=3, workers=1, progress=False)
    else:
        data = shard_train_data(a["shards"], CaptionEncoder(), "own")
        for c in a["widths"]:
            train(TrainConfig(width=c, **a["cfg"]), data, Path(a["out"]) / f"c{c}", accelerator=acc, progress=False,
                  loader_workers=a["workers"])
    Path(a["ranks"]).mkdir(exist_ok=True)
    Path(a["ranks"], f"rank{acc.process_index}.txt").write_text(str(acc.num_processes))   # how many processes really ran
""")


def _launch(tmp_path, args, wait=True):
    script = tmp_path / "runner.py"; script.write_text(RUNNER)
    ranks = tmp_path / f"ranks-{time.time_ns()}"
    cmd = launch_command(2, script, json.dumps(dict(args, ranks=str(ranks))))
    if not wait: return subprocess.Popen(cmd, env=ENV, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert sorted(p.read_text() for p in ranks.glob("rank*.txt")) == ["2", "2"], "the launch did not run two processes"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    "A captioned folder (10 images, two with 2 captions), 2 webdataset tars as img2dataset writes them, a stand-in VAE."
    import webdataset as wds
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    folder = root / "folder"; folder.mkdir()
    rows = []
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (36, 44, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
        rows += [(f"{i:03d}.png", f"image {i}")] + ([(f"{i:03d}.png", f"picture {i}")] if i in (3, 7) else [])
    (folder / "captions.csv").write_text("file,caption\n" + "".join(f"{f},{c}\n" for f, c in rows))
    tars = root / "tars"; tars.mkdir()
    for t in range(2):
        with wds.TarWriter(str(tars / f"{t:05d}.tar")) as w:
            for j in range(5):
                k = t * 5 + j
                w.write({"__key__": f"{t:05d}{j:04d}", "png": Image.open(folder / f"{k:03d}.png"), "txt": f"web image {k}",
                         "json": {"key": f"{t:05d}{j:04d}", "caption": f"web image {k}"}})
    AutoencoderKL(**ae_config(image_channels=3, block_out_channels=(8, 8, 8), image_size=32)).save_pretrained(root / "vae")
    return root


def test_two_processes_encode_a_folder_and_webdataset_tars_like_one(inputs, tmp_path):
    vae = AutoencoderKL.from_pretrained(inputs / "vae")
    one = LatentShards(encode_shards(ShardSource("folder", inputs / "folder", 32, block_size=4), vae, tmp_path / "one", progress=False))
    _launch(tmp_path, dict(job="encode", format="folder", root=str(inputs / "folder"), vae=str(inputs / "vae"), out=str(tmp_path / "two")))
    two = LatentShards(tmp_path / "two")
    assert two.shape == one.shape == (10, 4, 8, 8) and two.index["rows"] == [4, 4, 2]      # blocks 0, 2 by rank 0; 1 by rank 1
    rows = torch.arange(10)
    torch.testing.assert_close(two[rows], one[rows], rtol=0, atol=1e-5)
    assert two.captions([3, 4, 7]) == [["image 3", "picture 3"], ["image 4"], ["image 7", "picture 7"]]   # several captions, one row
    assert one.fingerprint == two.fingerprint
    _launch(tmp_path, dict(job="encode", format="webdataset", root=str(inputs / "tars"), vae=str(inputs / "vae"), out=str(tmp_path / "web")))
    web = LatentShards(tmp_path / "web")
    assert web.index["rows"] == [5, 5] and web.captions(range(10)) == [[f"web image {k}"] for k in range(10)]
    torch.testing.assert_close(web[rows], one[rows], rtol=0, atol=1e-5)    # the same images, from the tars


def test_encoding_resumes_at_the_first_missing_block(inputs, tmp_path):
    vae = AutoencoderKL.from_pretrained(inputs / "vae")
    src = ShardSource("folder", inputs / "folder", 32, block_size=4)
    real = src.loader
    def failing(k, *a, **kw):
        if k == 2: raise RuntimeError("killed while encoding block 2")
        return real(k, *a, **kw)
    src.loader = failing
    with pytest.raises(RuntimeError, match="block 2"): encode_shards(src, vae, tmp_path / "s", progress=False)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["block-00000", "block-00001"]   # whole blocks only, no index
    with pytest.raises(Exception, match="index.json"): LatentShards(tmp_path / "s")
    with pytest.raises(FileNotFoundError, match=r"blocks \['block-00002'\] are missing \(of 3\)"): write_index(tmp_path / "s", 3, {})
    stamp = {b: (tmp_path / "s" / b / "state.json").stat().st_mtime_ns for b in ("block-00000", "block-00001")}
    src.loader = real
    calls = []
    src.loader = lambda k, *a, **kw: calls.append(k) or real(k, *a, **kw)
    encode_shards(src, vae, tmp_path / "s", progress=False)
    assert calls == [2]                                                   # only the missing block is encoded
    assert stamp == {b: (tmp_path / "s" / b / "state.json").stat().st_mtime_ns for b in stamp}
    assert LatentShards(tmp_path / "s").shape[0] == 10


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="format='tfrecord'"): ShardSource("tfrecord", tmp_path, 32)
    with pytest.raises(ValueError, match="block_size must be a positive int"): ShardSource("folder", tmp_path, 32, block_size=0)
    with pytest.raises(FileNotFoundError, match="no .tar shards"): ShardSource("webdataset", tmp_path, 32)
    with pytest.raises(FileNotFoundError, match="no index.json"): LatentShards(tmp_path)


def _weights(path):
    return UNet2DConditionModel.from_pretrained(path).state_dict()


def test_two_process_training_from_shards_resumes_bit_for_bit_after_a_kill(inputs, tmp_path):
    vae = AutoencoderKL.from_pretrained(inputs / "vae")
    shards = encode_shards(ShardSource("folder", inputs / "folder", 32, block_size=4), vae, tmp_path / "shards", progress=False)
    job = dict(job="train", shards=str(shards), widths=[16, 24], cfg=CFG)
    _launch(tmp_path, dict(job, out=str(tmp_path / "ref"), workers=0))
    proc = _launch(tmp_path, dict(job, out=str(tmp_path / "killed"), workers=1), wait=False)
    state = tmp_path / "killed" / "c16" / "state" / "progress.json"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["step"] >= 2: break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL); proc.wait()
    assert not (tmp_path / "killed" / "c16" / "done.json").exists(), "the run finished before it could be killed"
    _launch(tmp_path, dict(job, out=str(tmp_path / "killed"), workers=1))
    for c in (16, 24):       # loader workers and a kill change nothing: the batch of step k is a function of (seed, step)
        ref, got = _weights(tmp_path / "ref" / f"c{c}" / "unet_ema"), _weights(tmp_path / "killed" / f"c{c}" / "unet_ema")
        assert all(torch.equal(ref[k], got[k]) for k in ref), f"c={c} differs after the kill and resume"


RSS = textwrap.dedent("""
    import ctypes, gc, re, resource, sys
    from ldm_paper.shards import shard_train_data
    from ldm_paper.text import CaptionEncoder
    from ldm_paper.train import TrainConfig, train
    def anon_mb():
        gc.collect(); ctypes.CDLL("libc.so.6").malloc_trim(0)          # freed memory back to the system first
        return int(re.search(r"RssAnon:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) // 1024
    data = shard_train_data(sys.argv[1], CaptionEncoder(), "own")
    train(TrainConfig(width=16, steps=2, batch_size=4, warmup_steps=1, save_every=10, log_every=1), data, sys.argv[2],
          progress=False)
    after = anon_mb()
    x = data.latents.table[:]["latent"]                                # what holding the whole set in memory costs
    print(after, anon_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
""")


def test_memory_does_not_grow_with_the_shard_set(tmp_path):
    """The process's own (anonymous) memory after training from 10x more shards is unchanged. The shards are memory-mapped:
    the pages a read touches count in RSS as file-backed page cache, shared and reclaimable (peak RSS is printed too)."""
    rng = np.random.default_rng(0)
    for name, blocks in (("small", 1), ("large", 10)):                 # 2k rows (32 MB of latents) vs 20k (320 MB)
        for k in range(blocks):
            lat = rng.standard_normal((2_000, 4, 32, 32), dtype=np.float32)
            write_block(tmp_path / name / f"block-{k:05d}", [str(i) for i in range(len(lat))], [["a photo of a bag"]] * len(lat), lat)
        write_index(tmp_path / name, blocks, dict(source=name, vae="none"))
    script = tmp_path / "rss.py"; script.write_text(RSS)
    def memory_mb(name):
        r = subprocess.run([sys.executable, str(script), str(tmp_path / name), str(tmp_path / f"run-{name}")],
                           capture_output=True, text=True, env=ENV, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        after, held, peak = map(int, r.stdout.split()[-3:])
        print(f"{name}: anonymous {after} MB after training, {held} MB holding the set; peak RSS {peak} MB")
        return after, held
    (small, _), (large, held) = memory_mb("small"), memory_mb("large")
    assert large - small < 50, (small, large)                          # the shard set grew by 290 MB
    assert held - large > 250                                          # the measurement sees a set held in memory
