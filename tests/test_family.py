import json

import pytest
import torch

from ldm_paper.family import (PAPER_TABLE1, SCALES, attention_gflops, build_unet, count_params, family_table,
                              forward_gflops, unet_config)


def test_c320_is_sd15():
    cfg = unet_config(320)
    assert cfg["block_out_channels"] == (320, 640, 1280, 1280)
    assert cfg["cross_attention_dim"] == 768 and cfg["attention_head_dim"] == 8 and cfg["norm_num_groups"] == 32
    # SD v1.5's UNet (runwayml/stable-diffusion-v1-5, subfolder unet) has exactly this many parameters
    assert count_params(build_unet(cfg, "meta")) == 859_520_964


def test_attention_is_counted():
    n, d = 256, 64
    proj = 2 * n * d * d * 4 / 1e9
    prod = 4 * n * n * d / 1e9
    assert attention_gflops(n, d) == pytest.approx(proj + prod, rel=1e-9)
    # the fused kernel hides the two products from the counter: exactly what we must not measure with
    assert attention_gflops(n, d, math_sdpa=False) == pytest.approx(proj, rel=1e-9)


def test_gflops_grow_with_tokens_only_through_cross_attention():
    cfg = SCALES["cpu"].config(16)
    a, b = forward_gflops(cfg, tokens=8), forward_gflops(cfg, tokens=16)
    assert b > a and (b - a) / a < 0.1


def test_paper_table_close_to_table1():
    rows = {r["c"]: r for r in family_table("paper")}
    assert set(rows) == set(PAPER_TABLE1)
    for c, r in rows.items():
        if c >= 96:
            assert abs(r["gflops_dev_pct"]) < 3.5, (c, r)
        if 96 <= c <= 320:
            assert abs(r["params_dev_pct"]) < 2.0, (c, r)
    assert rows[320]["norm_cost"] == 1.0
    assert rows[64]["norm_cost"] == pytest.approx(0.07, abs=0.01)  # matches the paper's printed normalized cost


def test_bad_widths_fail_clearly():
    with pytest.raises(ValueError, match="divisible by 8"):
        unet_config(60)
    with pytest.raises(ValueError, match="positive"):
        unet_config(0)
    with pytest.raises(ValueError, match="scale='huge'.*cpu"):
        family_table("huge")


def test_small_model_runs_forward():
    cfg = SCALES["cpu"].config(16)
    torch.manual_seed(0)
    m = build_unet(cfg).eval()
    x = torch.randn(2, 4, 8, 8)
    out = m(x, torch.tensor([10, 500]), encoder_hidden_states=torch.randn(2, 8, 128)).sample
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_cli_family_paper_json(capsys):
    from ldm_paper.cli import main
    assert main(["family", "--scale", "paper", "--json"]) == 0          # the console script's path, in this process
    out = capsys.readouterr().out
    rows = json.loads(out)
    assert len(rows) == 11 and all({"c", "params", "gflops", "norm_cost"} <= set(r) for r in rows)


def _diff_keys(a: dict, b: dict) -> set:
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


@pytest.mark.parametrize("scale", ["cpu", "paper"])
def test_widths_of_a_family_differ_in_width_alone(scale):
    """P1 changes only the width within a family: every width has the same GroupNorm groups and heads; the configs of
    two widths differ in `block_out_channels` and nothing else (an earlier gcd(c, 32) rule gave 16/8/32/16 groups)."""
    s = SCALES[scale]
    cfgs = {c: s.config(c) for c in s.widths}
    assert {cfg["norm_num_groups"] for cfg in cfgs.values()} == {s.norm_num_groups}
    assert {cfg["attention_head_dim"] for cfg in cfgs.values()} == {8}
    ref = cfgs[s.widths[0]]
    for c, cfg in cfgs.items():
        assert _diff_keys(ref, cfg) <= {"block_out_channels"}, (c, _diff_keys(ref, cfg))
    assert s.norm_num_groups == (8 if scale == "cpu" else 32)
    # the group count really reaches the built model's GroupNorm layers
    m = build_unet(cfgs[s.widths[-1]], "meta")
    groups = {mod.num_groups for mod in m.modules() if isinstance(mod, torch.nn.GroupNorm)}
    assert groups == {s.norm_num_groups}


def test_group_count_must_divide_the_width():
    with pytest.raises(ValueError, match="norm_num_groups"):
        unet_config(16, latent_size=8, context_dim=128)           # SD's 32 groups do not divide 16
    with pytest.raises(ValueError, match="norm_num_groups"):
        unet_config(24, latent_size=8, context_dim=128, norm_num_groups=16)
