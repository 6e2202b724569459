import math


def test_bench_writes_one_row_per_width_with_ratios_measured_in_the_same_run(tmp_path, capsys):
    from ldm_paper.cli import main
    out = tmp_path / "bench.csv"
    assert main(["bench", "--quick", "--widths", "16", "--out", str(out)]) == 0    # the console script's path, in this process
    stdout = capsys.readouterr().out
    import pandas as pd
    from ldm_paper.bench import BENCH_FIELDS
    df = pd.read_csv(out)
    assert tuple(df.columns) == BENCH_FIELDS and df.width.tolist() == [16]
    row = df.iloc[0]
    assert row.peak_gflop_s > 1 and 0 < row.train_peak_frac < 1.5 and 0 < row.sample_peak_frac < 1.5
    # every fraction and ratio is recomputed from the row's own numbers
    assert abs(row.train_gflop_s / row.peak_gflop_s - row.train_peak_frac) < 2e-3
    # the ratios come from unrounded rates; the CSV's rates are rounded, so compare within 3%
    assert math.isclose(row.train_samples_s / row.plain_train_samples_s, row.train_vs_plain, rel_tol=0.03)
    assert math.isclose(row.sample_images_s / row.plain_sample_images_s, row.sample_vs_plain, rel_tol=0.03)
    assert "fp32 matmul peak" in stdout and "written:" in stdout


def test_bench_rejects_a_width_outside_the_family(capsys):
    import pytest
    from ldm_paper.cli import main
    with pytest.raises(SystemExit) as exit:          # the console script's path, in this process: argparse exits with 2
        main(["bench", "--quick", "--widths", "20"])
    assert exit.value.code == 2 and "widths=[20] are not in the cpu family" in capsys.readouterr().err


def test_bench_variants_measures_each_technique_against_eager_in_the_same_run(tmp_path, capsys):
    from ldm_paper.cli import main
    out = tmp_path / "variants.csv"
    assert main(["bench", "--variants", "--quick", "--widths", "16", "--batch-size", "8", "--out", str(out)]) == 0
    import pandas as pd
    from ldm_paper.bench import VARIANT_FIELDS, VARIANTS
    df = pd.read_csv(out)
    assert tuple(df.columns) == VARIANT_FIELDS
    assert df.variant.tolist() == list(VARIANTS[:-1]) and set(df.width) == {16}     # compile only with --compile
    eager = df[df.variant == "eager"].iloc[0]
    assert (eager.train_vs_eager, eager.sample_vs_eager) == (1.0, 1.0)
    # every ratio is the row's rate over eager's of the same run (rates rounded to 0.1 in the CSV)
    for r in df.itertuples():
        assert math.isclose(r.train_samples_s / eager.train_samples_s, r.train_vs_eager, rel_tol=0.02, abs_tol=0.01)
        assert math.isclose(r.sample_images_s / eager.sample_images_s, r.sample_vs_eager, rel_tol=0.02, abs_tol=0.01)
    # attention's share of the time exceeds its share of the FLOPs at c=16 (head dimension 2): the ceiling the README names
    assert 0 < eager.attention_flop_frac < 0.2 and eager.attention_time_frac > eager.attention_flop_frac
    assert "written:" in capsys.readouterr().out



def test_bench_refuses_compile_without_variants_and_a_bad_sample_batch():
    import pytest
    from ldm_paper.cli import main
    from ldm_paper.bench import step_rates
    with pytest.raises(SystemExit, match="--compile requires --variants"): main(["bench", "--compile", "--quick"])
    with pytest.raises(ValueError, match="sample_batch must be a positive int"): step_rates(16, "cpu", batch=2, sample_batch=0)
    with pytest.raises(SystemExit, match="choose --loops or --variants"): main(["bench", "--loops", "--variants", "--quick"])


def test_compile_in_loops_checks_its_settings_by_name():
    import pytest
    from ldm_paper.bench import compile_in_loops
    with pytest.raises(ValueError, match=r"widths=\[20\] are not in the cpu family"): compile_in_loops((20,))
    with pytest.raises(ValueError, match="train_threads must be a positive int"): compile_in_loops((16,), train_threads=0)
