"""The verdict rules of `ldm_paper.findings` on synthetic tables: every finding can reproduce, partly reproduce, fail to
reproduce and be inconclusive, and the cases where the old rules answered by construction now answer from the data."""
import json

import numpy as np
import pandas as pd
import pytest

from ldm_paper.findings import (MATCH_TOL, VERDICTS, Z_DECISIVE, budget_frontier, budget_winners, decide, finding1, finding2,
                                finding3, finding4, finding5, finding6, finding_p2, under_both, verdict, write_verdict)

FOUR = ("reproduces", "partly", "does not reproduce", "inconclusive")


# ---------------------------------------------------------------------------------------------------------------
# synthetic tables

def with_b(df, shift=0.0, sd=None):
    "Add network B's columns: fid_b = fid + shift, fid_b_sd = fid_sd (or `sd`), and the 95% bounds of both."
    df = df.assign(fid_b=df.fid + shift, fid_b_sd=df.fid_sd if sd is None else sd)
    for m in ("fid", "fid_b"):
        df[f"{m}_lo"], df[f"{m}_hi"] = df[m] - 1.96 * df[f"{m}_sd"], df[m] + 1.96 * df[f"{m}_sd"]
    return df


def family(bases, a=40.0, steps=(4, 8, 16, 32, 64), sd=0.1, cfgs=(2.0, 3.0), sampler="ddim"):
    "Rows width x steps x CFG: fid = base + a/steps (+0.7 away from CFG 3), sampling_cost = norm_cost * steps; bases={w: (nc, base)}."
    return with_b(pd.DataFrame([dict(width=w, steps=k, cfg_scale=g, norm_cost=nc, sampling_cost=nc * k, sampler=sampler,
                                     checkpoint="final", kind="base", fid=b + a / k + 0.7 * (g != 3.0), fid_sd=sd)
                                for w, (nc, b) in bases.items() for k in steps for g in cfgs]))


def fig9_like(**kw):      # the winner moves up with the budget; the largest wins at the largest budget by far more than the spread
    return family({16: (0.1, 10), 32: (0.3, 6), 64: (1.0, 3)}, **kw)


def one_width_best(**kw):  # like c=24 at the cpu preset: best at every cost it reaches, bigger widths never win
    return family({16: (0.1, 8), 24: (0.2, 2), 32: (0.3, 8), 48: (0.6, 8)}, **kw)


def bigger_better(**kw):   # bigger is better at every cost
    return family({16: (0.1, 20), 32: (0.3, 12), 64: (1.0, 4)}, a=10, **kw)


def training(fid, widths=(16, 32, 64), sd=0.1):
    "Checkpoints along training at compute (1, 2, 4, 8) x width/16 with FID fid(width, compute)."
    return with_b(pd.DataFrame([dict(width=w, checkpoint=f"step-{i}", train_compute=c * w / 16, steps=16, cfg_scale=3.0,
                                     fid=fid(w, c * w / 16), fid_sd=sd) for w in widths for i, c in enumerate((1, 2, 4, 8))]))


def sr_training(points, sd=0.1):
    "SR rows along fine-tuning compute: {width: [(compute, fid), ...]}."
    return with_b(pd.DataFrame([dict(width=w, checkpoint=f"step-{i}", train_compute=c, fid=f, fid_sd=sd)
                                for w, pts in points.items() for i, (c, f) in enumerate(pts)]))


def sr_cost(points, sd=0.1):
    "SR rows at several step counts: {width: (norm_cost, {steps: fid})}."
    return with_b(pd.DataFrame([dict(width=w, steps=k, cfg_scale=1.0, sampling_cost=nc * k, fid=f, fid_sd=sd)
                                for w, (nc, fs) in points.items() for k, f in fs.items()]))


def v(record): return record["verdict"]


def status(record, half): return record["halves"][half]["status"]


# ---------------------------------------------------------------------------------------------------------------
# decide and the budget frontier

def test_decide_only_beyond_the_spread():
    s = 0.5
    margin = Z_DECISIVE * np.hypot(s, s)
    assert decide(10.0, s, 10.0 + 0.99 * margin, s) == 0 and decide(10.0 + 0.99 * margin, s, 10.0, s) == 0
    assert decide(10.0, s, 10.0 + 1.01 * margin, s) == 1 and decide(10.0 + 1.01 * margin, s, 10.0, s) == -1
    assert decide(10.0, 0.0, 10.0, 0.0) == 0 and decide(1.0, 0.0, 2.0, 0.0) == 1
    assert decide(1.0, np.nan, 2.0, 0.1) == 0 and decide(1.0, 0.1, 5.0, 0.1, z=100) == 0
    with pytest.raises(ValueError, match="z="): decide(1, 0, 2, 0, z=-1)


def test_budget_frontier_is_a_step_function_over_measured_costs():
    df = fig9_like()
    f = budget_frontier(df)
    assert list(f.columns[:4]) == ["budget", "width", "fid", "fid_sd"]
    assert sorted(f.budget.unique()) == sorted(df.sampling_cost.unique())           # every measured cost, no grid
    for w, g in f.groupby("width"):
        vals = g.sort_values("budget").fid.dropna().to_numpy()
        assert (np.diff(vals) <= 1e-12).all()                                        # non-increasing in the budget
        first = df[df.width == w].sampling_cost.min()
        assert g[g.budget < first].fid.isna().all() and g[g.budget >= first].fid.notna().all()
    top = f[f.budget == f.budget.max()].set_index("width").fid
    assert top.to_dict() == pytest.approx(df.groupby("width").fid.min().to_dict())   # the best over every CFG and step count
    assert budget_frontier(df, metric="fid_b").columns[2:4].tolist() == ["fid_b", "fid_b_sd"]


def test_budget_winners_format_and_decisiveness():
    w = budget_winners(fig9_like())
    assert {"budget", "n_widths", "winner", "fid", "fid_sd", "runner_up", "runner_up_fid", "runner_up_fid_sd", "decisive"} <= set(w.columns)
    assert w.winner.iloc[0] is None and w.n_widths.iloc[0] == 1                      # one width affordable: no winner
    shared = w.dropna(subset=["winner"])
    assert shared.winner.iloc[0] == 16 and shared.winner.iloc[-1] == 64 and bool(shared.decisive.iloc[-1])
    assert not budget_winners(fig9_like(sd=50.0)).decisive.any()


# ---------------------------------------------------------------------------------------------------------------
# finding 3

def test_finding3_all_four_verdicts():
    r = finding3(fig9_like(), "t")
    assert v(r) == "reproduces" and status(r, "A") == status(r, "B") == "true"
    assert r["halves"]["A"]["numbers"]["winner"]["width"] == 16
    assert v(finding3(bigger_better(), "t")) == "does not reproduce"
    assert v(finding3(fig9_like(sd=50.0), "t")) == "inconclusive"
    r = finding3(one_width_best(), "t")
    assert v(r) == "partly" and (status(r, "A"), status(r, "B")) == ("true", "false")
    assert r["halves"]["B"]["numbers"]["beater"]["width"] == 24
    assert v(finding3(fig9_like()[lambda d: d.width == 16], "t")) == "not run"


def reversed_pattern():
    "The bigger width wins every small budget; the small one needs many steps and wins only at the largest budget."
    rows = [dict(width=16, steps=k, sampling_cost=0.1 * k, fid=0.5 + 3000 / k) for k in (4, 8, 16, 32, 64, 128, 256, 512, 1024)]
    rows += [dict(width=64, steps=k, sampling_cost=1.0 * k, fid=4.5 + 4 / k) for k in (4, 8, 16, 32, 64)]
    return with_b(pd.DataFrame(rows).assign(cfg_scale=3.0, fid_sd=0.1))


def test_finding3_an_upset_only_at_large_budgets_is_not_half_a():
    """Old rule: any upset made half A true, so the reverse of P1's pattern came out 'partly'. Now half A looks at the
    lower half (log scale) of the shared budgets only: the reversed pattern does not reproduce."""
    r = finding3(reversed_pattern(), "t")
    assert (status(r, "A"), status(r, "B")) == ("false", "false") and v(r) == "does not reproduce"
    assert "at larger budgets only" in r["halves"]["A"]["why"]
    small_max = r["halves"]["A"]["numbers"]["small_budget_max"]
    assert small_max == pytest.approx(np.sqrt(4 * 102.4))


def test_finding3_bigger_better_is_not_half_reproduced():
    """The old rule kept only costs with two curves, so "the low-cost winner is smaller" held by construction."""
    r = finding3(bigger_better(), "t")
    assert status(r, "A") == "false" and status(r, "B") == "true" and v(r) == "does not reproduce"


def test_finding3_record_has_rule_halves_and_spreads():
    r = finding3(fig9_like(), "t")
    assert r["rule"] and set(r["halves"]) == {"A", "B"} and "±" in r["ours"]
    assert all(h["status"] in ("true", "false", "undecided") and h["why"] for h in r["halves"].values())
    assert r["verdict"] in VERDICTS


def test_finding3_picks_the_best_cfg_itself():
    worse_cfg = fig9_like(cfgs=(3.0,)).assign(cfg_scale=9.0, fid=lambda d: d.fid + 50)    # a useless scale changes nothing
    assert v(finding3(pd.concat([fig9_like(), worse_cfg]), "t")) == "reproduces"


def test_finding3_needs_the_spread_unless_told():
    with pytest.raises(ValueError, match="fid_sd"): finding3(fig9_like().drop(columns="fid_sd"), "t")
    assert v(finding3(fig9_like().drop(columns="fid_sd"), "t", sd_missing="zero")) == "reproduces"
    with pytest.raises(ValueError, match="sd_missing"): finding3(fig9_like(), "t", sd_missing="guess")
    with pytest.raises(ValueError, match="sampler='dpm'"): finding3(fig9_like(), "t", sampler="dpm")


# ---------------------------------------------------------------------------------------------------------------
# finding 4

def narrow_overlap(sampler):
    "Two widths whose cost ranges overlap only on [2.28, 2.40]: the small one wins there, the big one at the largest budget."
    rows = [(16, c, f) for c, f in zip((0.3, 0.6, 1.2, 2.40), (20, 12, 8, 6))] + [(32, c, f) for c, f in zip((2.28, 4.56, 9.12), (9, 5, 3))]
    return with_b(pd.DataFrame([dict(width=w, sampling_cost=c, fid=f, fid_sd=0.1, sampler=sampler, cfg_scale=3.0) for w, c, f in rows]))


def test_finding4_sees_a_narrow_overlap():
    r = finding4(pd.concat([narrow_overlap("ddim"), narrow_overlap("dpmsolver++")]), "t")
    assert v(r) == "reproduces"
    assert r["halves"]["dpmsolver++.A"]["status"] == "true" and r["halves"]["dpmsolver++.A"]["numbers"]["budget"] == 2.28


def test_finding4_all_verdicts():
    def two(a, b): return pd.concat([a.assign(sampler="ddim"), b.assign(sampler="ddpm")])
    assert v(finding4(two(fig9_like(), fig9_like()), "t")) == "reproduces"
    assert v(finding4(two(fig9_like(), fig9_like(sd=50.0)), "t")) == "partly"
    r = finding4(two(fig9_like(), bigger_better()), "t")                          # the samplers contradict each other
    assert v(r) == "does not reproduce" and r["details"]["contradictions"]
    assert v(finding4(two(fig9_like(sd=50.0), fig9_like(sd=50.0)), "t")) == "inconclusive"
    assert v(finding4(fig9_like(), "t")) == "not run"                             # DDIM alone
    assert v(finding4(fig9_like().assign(sampler="ddpm"), "t")) == "not run"


def test_finding4_needs_finding3_under_every_sampler():
    "Old rule: the same verdict under every sampler was 'reproduces', even when that verdict was 'does not reproduce'."
    def two(a, b): return pd.concat([a.assign(sampler="ddim"), b.assign(sampler="ddpm")])
    r = finding4(two(bigger_better(), bigger_better()), "t")
    assert v(r) == "does not reproduce" and not r["details"]["contradictions"]
    r = finding4(two(one_width_best(), fig9_like(sd=50.0)), "t")                # partly under one, inconclusive under the other
    assert v(r) == "partly"
    r = finding4(two(one_width_best(), one_width_best()), "t")                  # partly under both, the same halves
    assert v(r) == "partly" and not r["details"]["contradictions"]


def test_finding4_compares_every_pair_not_only_with_ddim():
    df = pd.concat([fig9_like().assign(sampler="ddim"), fig9_like(sd=50.0).assign(sampler="ddpm"),
                    bigger_better().assign(sampler="dpmsolver++")])
    r = finding4(df, "t")
    assert v(r) == "does not reproduce" and any(c[1:] == ["ddim", "dpmsolver++"] for c in r["details"]["contradictions"])


# ---------------------------------------------------------------------------------------------------------------
# finding 1

def test_finding1_all_verdicts():
    good = training(lambda w, c: 40 / c * 16 / w + 2)                               # bigger better at the end and at equal compute
    late = training(lambda w, c: 40 / c * w / 16 + {16: 6, 32: 4, 64: 2}[w])         # bigger better only at the end
    assert v(finding1(good, "t")) == "reproduces"
    r = finding1(late, "t")
    assert v(r) == "partly" and (status(r, "A"), status(r, "B")) == ("true", "false")
    assert v(finding1(good.assign(fid_sd=30.0), "t")) == "inconclusive"
    assert v(finding1(good[good.width == 16], "t")) == "not run"


def test_finding1_falling_fid_alone_is_not_evidence():
    wrong = training(lambda w, c: 40 / c * w / 16 + {16: 2, 32: 4, 64: 6}[w])        # every curve falls; sizes reversed
    r = finding1(wrong, "t")
    assert all(r["details"]["fell"].values())
    assert v(r) == "does not reproduce"


def test_finding1_mixed_order_is_not_reproduced():
    mixed = training(lambda w, c: 40 / c + {16: 3.0, 32: 1.5, 64: 2.5}[w])            # the middle width is best at the end
    assert v(finding1(mixed, "t")) != "reproduces"


# ---------------------------------------------------------------------------------------------------------------
# finding 2

def test_finding2_all_verdicts():
    good = sr_training({16: [(1, 9), (2, 8), (4, 7)], 64: [(2, 5), (4, 4), (8, 3), (16, 2)]})
    closes = sr_training({16: [(1, 9), (2, 6), (4, 3)], 64: [(2, 8), (4, 5), (8, 2.5), (16, 2)]})
    small = sr_training({16: [(1, 5), (2, 3), (4, 2)], 64: [(2, 9), (4, 8), (8, 7), (16, 6)]})
    assert v(finding2(good, "t")) == "reproduces"
    r = finding2(closes, "t")
    assert v(r) == "partly" and status(r, "B") == "false"
    assert v(finding2(small, "t")) == "does not reproduce"
    assert v(finding2(good.assign(fid_sd=30.0), "t")) == "inconclusive"
    assert v(finding2(good[good.width == 16], "t")) == "not run"


# ---------------------------------------------------------------------------------------------------------------
# finding 5

FEW = {16: (0.07, {4: 5.0, 8: 5.2, 16: 5.8, 32: 6.1}), 32: (0.26, {4: 7.0, 8: 3.2, 16: 2.9, 32: 2.75})}
BOTH = {16: (0.07, {4: 5.0, 8: 5.2, 16: 5.8, 32: 6.1, 64: 6.0, 128: 6.0, 256: 6.0}),
        32: (0.26, {4: 7.0, 8: 3.2, 16: 2.9, 32: 2.75, 64: 2.7})}


def test_finding5_one_point_per_width_above_20_steps_decides_nothing():
    r = finding5(sr_cost(FEW), "t")
    assert status(r, "A") == "true" and status(r, "B") == "undecided" and v(r) == "partly"
    assert "no shared costs above 20 steps" in r["ours"]


def test_finding5_all_verdicts():
    assert v(finding5(sr_cost(BOTH), "t")) == "reproduces"
    big_wins = {16: (0.07, {4: 9.0, 8: 8.5, 16: 8.0, 32: 8.0}), 32: (0.26, {4: 3.0, 8: 2.8, 16: 2.7, 32: 2.6})}
    assert v(finding5(sr_cost(big_wins), "t")) == "does not reproduce"
    assert v(finding5(sr_cost(BOTH, sd=30.0), "t")) == "inconclusive"
    assert v(finding5(sr_cost({16: BOTH[16]}), "t")) == "not run"


# ---------------------------------------------------------------------------------------------------------------
# finding 6

def undistilled(bases={16: (0.1, 6.0), 64: (1.0, 4.0)}, steps=(4, 8, 16, 32, 64), sd=0.1):
    "Undistilled DDIM at CFG 2 and 3 (3 better by 0.5): fid = base + 20/steps."
    return with_b(pd.DataFrame([dict(width=w, steps=k, cfg_scale=g, sampling_cost=nc * k, fid=b + 20 / k + 0.5 * (g == 2), fid_sd=sd)
                                for w, (nc, b) in bases.items() for k in steps for g in (2.0, 3.0)]))


def distilled(fids, sd=0.1, steps=4, nc={16: 0.1, 64: 1.0}):
    return with_b(pd.DataFrame([dict(width=w, steps=steps, cfg_scale=1.0, sampling_cost=nc[w] * steps, fid=f, fid_sd=sd)
                                for w, f in fids.items()]))


def test_finding6_matches_at_the_nearest_cost_whatever_the_steps():
    r = finding6(distilled({16: 8.0, 64: 6.5}), undistilled(), "t")
    assert v(r) == "reproduces"
    small, big = r["halves"]["B"]["numbers"]["small"], r["halves"]["B"]["numbers"]["big"]
    assert (small["steps"], big["steps"]) == (32, 4)                   # cost 3.2 is nearest to 4.0 in log cost; 64 steps is not
    assert small["fid"] == pytest.approx(6.625) and small["fid"] <= (1 + MATCH_TOL) * big["fid"]


def test_finding6_all_verdicts():
    u = undistilled()
    assert v(finding6(distilled({16: 12.0, 64: 6.5}), u, "t")) == "partly"       # c=16's student loses, the match holds
    r = finding6(distilled({16: 12.0, 64: 3.0}), u, "t")                         # no undistilled c=16 point comes near 3.0
    assert v(r) == "does not reproduce" and status(r, "B") == "false"
    assert v(finding6(distilled({16: 8.0, 64: 6.5}, sd=5.0), undistilled(sd=5.0), "t")) == "inconclusive"
    assert v(finding6(distilled({16: 8.0}), u[u.steps > 4], "t")) == "not run"


def test_finding6_cannot_match_far_away():
    r = finding6(distilled({16: 8.0, 64: 5.0}), undistilled(), "t")              # 6.625 vs 5.0: 33% worse, beyond 10% + spread
    assert status(r, "B") == "false" and v(r) == "partly"


# ---------------------------------------------------------------------------------------------------------------
# P2

P2_D = dict(steps=[1, 2, 4, 8], fid=[9.12, 4.51, 3.00, 2.57])
P2_U = dict(steps=[4, 10, 20, 50, 100], fid=[30, 13.36, 6.84, 4.67, 4.16])


def p2(d=P2_D, u=P2_U, sd=0.1):
    return (with_b(pd.DataFrame(d).assign(width=32, fid_sd=sd)),
            with_b(pd.concat([pd.DataFrame(u).assign(cfg_scale=3.0), pd.DataFrame(u).assign(cfg_scale=1.0, fid=lambda t: t.fid + 1)])
                   .assign(width=32, fid_sd=sd)))


def test_finding_p2_all_verdicts():
    assert v(finding_p2(*p2(), "t")) == "reproduces"
    assert v(finding_p2(*p2(dict(P2_D, fid=[9.12, 4.51, 3.00, 6.0])), "t")) == "partly"          # 8 steps 6.0 vs 4.16: not close
    assert v(finding_p2(*p2(dict(P2_D, fid=[90, 60, 40, 6.0])), "t")) == "does not reproduce"
    assert v(finding_p2(*p2(sd=20.0), "t")) == "inconclusive"
    with pytest.raises(ValueError, match="one width"):
        finding_p2(p2()[0].assign(width=[16, 16, 32, 32]), p2()[1], "t")


# ---------------------------------------------------------------------------------------------------------------
# two networks

def test_under_both_agreement_and_disagreement():
    both = under_both(finding3, fig9_like(), "t", source="fig09")
    assert v(both) == "reproduces" and set(both["by_net"]) == {"fid", "fid_b"}
    assert "network A" in both["ours"] and "network B" in both["ours"] and "±" in both["ours"]
    disagree = fig9_like().assign(fid_b=bigger_better().fid.to_numpy())            # network B sees bigger-better
    r = under_both(finding3, disagree, "t")
    assert v(r) == "inconclusive" and "disagree" in r["ours"]
    assert (v(r["by_net"]["fid"]), v(r["by_net"]["fid_b"])) == ("reproduces", "does not reproduce")
    r = under_both(finding4, pd.concat([narrow_overlap("ddim"), narrow_overlap("ddpm")]), "t")
    assert v(r) == "reproduces"


def test_under_both_reproduces_with_partly_is_partly():
    b = fig9_like()
    b = b.assign(fid_b=b.fid.where(b.width != 64, b.fid + 20))                      # under B the largest loses at the largest budget
    r = under_both(finding3, b, "t")
    assert (v(r["by_net"]["fid"]), v(r["by_net"]["fid_b"])) == ("reproduces", "partly") and v(r) == "partly"


@pytest.mark.parametrize("rule,args", [
    (finding3, lambda: (fig9_like(),)),
    (finding1, lambda: (training(lambda w, c: 40 / c * 16 / w + 2),)),
    (finding6, lambda: (distilled({16: 8.0, 64: 6.5}), undistilled())),
])
def test_under_both_never_reproduces_when_networks_disagree(rule, args):
    tables = args()
    flipped = [t.assign(fid_b=t.fid.max() + 100 - t.fid) for t in tables]            # network B reverses every ordering
    r = under_both(rule, *flipped, "t")
    if v(r["by_net"]["fid"]) != v(r["by_net"]["fid_b"]): assert v(r) != "reproduces"


def test_under_both_without_network_b():
    old = fig9_like().drop(columns=["fid_b", "fid_b_sd", "fid_b_lo", "fid_b_hi"])
    r = under_both(finding3, old, "t")
    assert v(r["by_net"]["fid"]) == "reproduces" and v(r["by_net"]["fid_b"]) == "not run" and v(r) == "partly"
    assert "not measured" in r["ours"]
    with pytest.raises(ValueError, match="fid_b_sd"):
        under_both(finding3, fig9_like().drop(columns="fid_b_sd"), "t")
    assert v(under_both(finding3, fig9_like().drop(columns=["fid_sd", "fid_b_sd"]), "t", sd_missing="zero")) == "reproduces"


@pytest.mark.parametrize("want", FOUR)
def test_under_both_all_verdicts(want):
    tables = {"reproduces": fig9_like(), "partly": one_width_best(), "does not reproduce": bigger_better(),
              "inconclusive": fig9_like(sd=50.0)}
    assert v(under_both(finding3, tables[want], "t")) == want


def test_combined_record_is_written_as_json(tmp_path):
    r = under_both(finding6, distilled({16: 8.0, 64: 6.5}), undistilled(), "t", source="fig13")
    p = write_verdict(r, tmp_path)
    back = json.loads(p.read_text())
    assert p.name == "finding6_t.json" and back["verdict"] == "reproduces" and back["rule"]
    assert back["by_net"]["fid_b"]["halves"]["B"]["status"] == "true"
    assert set(back["halves"]) == {"fid", "fid_b"}


def test_verdict_record_fields():
    r = verdict(3, "ours", "inconclusive", "fig09", "t", rule="a rule", halves={"A": {"status": "undecided"}})
    assert {"finding", "claim", "paper", "ours", "verdict", "source", "preset", "rule", "halves", "details"} <= set(r)
    with pytest.raises(ValueError, match="verdict='maybe'"): verdict(3, "", "maybe", "x", "t")
