"""Evaluation store: cached rows, early errors, best-over-CFG, costs."""
import time

import pytest

from ldm_paper.evaluate import evaluate, evaluate_grid, results_table, best_over_cfg, result_path, model_info
from ldm_paper.experiment import train_family


@pytest.fixture(scope="module")
def runs():
    return train_family("ci", progress=False)


def test_row_has_protocol_and_costs(runs):
    r = evaluate("ci", runs[16], 16, steps=2, cfg_scale=3.0, n_samples=20)
    for k in ("fid", "agreement", "n_samples", "n_reference", "feature_net", "sampler", "steps", "cfg_scale", "seed", "weights"):
        assert k in r
    assert r["sampling_cost"] == pytest.approx(model_info("cpu", 16)["norm_cost"] * 2)
    assert r["sampling_gflops"] == pytest.approx(model_info("cpu", 16)["gflops"] * 2 * 2)   # CFG doubles the passes
    assert result_path("ci", r["key"]).exists()


def test_cache_skips_finished_work(runs, monkeypatch):
    evaluate("ci", runs[16], 16, steps=2, cfg_scale=3.0, n_samples=20)
    import ldm_paper.evaluate as ev
    monkeypatch.setattr(ev, "sample", lambda *a, **k: pytest.fail("sampled again"))
    evaluate("ci", runs[16], 16, steps=2, cfg_scale=3.0, n_samples=20)     # would fail had it sampled again


def test_same_seed_same_fid_and_seed_matters(runs):
    a = evaluate("ci", runs[16], 16, steps=2, cfg_scale=1.0, n_samples=20, seed=0, force=True)
    b = evaluate("ci", runs[16], 16, steps=2, cfg_scale=1.0, n_samples=20, seed=0, force=True)
    c = evaluate("ci", runs[16], 16, steps=2, cfg_scale=1.0, n_samples=20, seed=1)
    assert a["fid"] == b["fid"] and a["fid"] != c["fid"]


@pytest.mark.parametrize("kw,msg", [(dict(sampler="euler"), "sampler='euler'"), (dict(steps=0), "steps must be"),
                                    (dict(steps=2.5), "steps must be"), (dict(cfg_scale=0.5), "cfg_scale must be"),
                                    (dict(n_samples=1), "n_samples must be")])
def test_bad_settings_fail_before_any_work(runs, kw, msg, monkeypatch):
    import ldm_paper.evaluate as ev
    monkeypatch.setattr(ev, "train_family", lambda *a, **k: pytest.fail("started work"))
    with pytest.raises(ValueError, match=msg.replace("(", r"\(")):
        evaluate_grid("ci", **_grid_kw(kw))


def _grid_kw(kw):
    out = {}
    for k, v in kw.items():
        out.update({"sampler": dict(samplers=(v,)), "steps": dict(steps=(v,)), "cfg_scale": dict(cfg_scales=(v,)),
                    "n_samples": dict(n_samples=v)}[k])
    return out


def test_best_over_cfg_picks_the_minimum(runs):
    df = evaluate_grid("ci", widths=(16,), steps=(2,), cfg_scales=(1.0, 3.0), n_samples=20, progress=False)
    best = best_over_cfg(df)
    assert len(best) == 1 and best.fid.iloc[0] == df.fid.min()
    assert len(results_table("ci")) >= 2


def test_evaluation_keys_of_different_models_differ(tmp_path):
    """Regression: SR runs of different widths once shared one cache row because a name with a '/' was cut to its
    last part. Every distinct model name or folder gets its own key; the same one always the same key."""
    from ldm_paper.evaluate import evaluation_key
    args = ("ddim", 8, 1.0, 40, 0, "net")
    names = ["superres:cpu-c16-aaa", "superres:cpu-c64-bbb", "cpu-c16-aaa/superres", "cpu-c64-bbb/superres"]
    for d in ("cpu-c16-aaa", "cpu-c64-bbb"): (tmp_path / d).mkdir()
    keys = [evaluation_key("ci", n, "final", *args) for n in names]
    keys += [evaluation_key("ci", tmp_path / d, "final", *args) for d in ("cpu-c16-aaa", "cpu-c64-bbb")]
    assert len(set(keys[:4])) == 4 and keys[4] != keys[5]
    assert keys[0] == evaluation_key("ci", "superres:cpu-c16-aaa", "final", *args)
    # a run folder is keyed by its name (which holds its config hash), wherever the cache lives
    (tmp_path / "moved" / "cpu-c16-aaa").mkdir(parents=True)
    assert keys[4] == evaluation_key("ci", tmp_path / "moved" / "cpu-c16-aaa", "final", *args)
