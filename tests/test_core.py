import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest
import torch

from ldm_paper.core import (atomic_write, cache_dir, check_choice, config_hash, image_generator, read_json,
                            repo_root, seed_everything, write_json)


def test_repo_root_finds_settings(root):
    assert repo_root() == root
    assert repo_root(root / "nbs") == root


def test_config_hash_is_stable_and_sensitive():
    a = config_hash({"c": 32, "sampler": "ddim", "steps": [4, 8]})
    assert a == config_hash({"steps": (4, 8), "sampler": "ddim", "c": 32.0})
    assert a != config_hash({"c": 32, "sampler": "ddim", "steps": [8, 4]})
    # the same value in a fresh interpreter: no dependence on PYTHONHASHSEED or process


def test_config_hash_across_processes():
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        other = pool.apply(config_hash, ({"c": 48, "cfg": 3.0},))
    assert other == config_hash({"c": 48, "cfg": 3.0})


def _write_slowly(path):
    with atomic_write(path) as f:
        f.write("partial")
        f.flush()
        time.sleep(30)
        f.write(" complete")


def test_atomic_write_survives_a_kill(tmp_path):
    p = tmp_path / "result.json"
    write_json(p, {"fid": 1.5})
    proc = mp.get_context("spawn").Process(target=_write_slowly, args=(p,))
    proc.start()
    deadline = time.time() + 20
    while time.time() < deadline and not any(x.name.endswith(".tmp") for x in tmp_path.iterdir()):
        time.sleep(0.05)
    proc.kill(); proc.join()
    assert read_json(p) == {"fid": 1.5}  # the killed writer never replaced the finished file


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_PAPER_CACHE", str(tmp_path / "c"))
    assert cache_dir("latents") == tmp_path / "c" / "latents" and (tmp_path / "c" / "latents").is_dir()


def test_seeds():
    g = seed_everything(3)
    assert torch.equal(torch.randn(4, generator=g), torch.randn(4, generator=torch.Generator().manual_seed(3)))
    x = torch.randn(5, generator=image_generator(0, 10))
    assert torch.equal(x, torch.randn(5, generator=image_generator(0, 10)))
    assert not torch.equal(x, torch.randn(5, generator=image_generator(1, 10)))
    with pytest.raises(ValueError, match="seed"):
        seed_everything(-2)


def test_check_choice_names_parameter_and_values():
    with pytest.raises(ValueError, match=r"prediction_type='eps2'.*\['eps', 'v'\]"):
        check_choice("prediction_type", "eps2", ["eps", "v"])


def test_folder_lock_serializes_processes(tmp_path):
    """Two processes asking for the same folder take turns: their start/end marks never interleave."""
    import subprocess, sys, textwrap
    code = textwrap.dedent(f"""
        import time, sys
        from ldm_paper.core import folder_lock
        with folder_lock(r"{tmp_path / 'run'}"):
            with open(r"{tmp_path / 'log'}", "a") as f: f.write(sys.argv[1] + "+\\n"); f.flush()
            time.sleep(1.0)
            with open(r"{tmp_path / 'log'}", "a") as f: f.write(sys.argv[1] + "-\\n")
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, name]) for name in ("a", "b")]
    assert all(p.wait(timeout=60) == 0 for p in procs)
    marks = (tmp_path / "log").read_text().split()
    assert len(marks) == 4 and marks[0][0] == marks[1][0] and marks[2][0] == marks[3][0]
