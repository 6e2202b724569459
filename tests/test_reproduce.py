"""The figure runner: the real manifest against the notebooks and the papers' figure list; failures, resume after a
kill, argument errors, the paper-scale dry run and the submitit path, on tiny throw-away notebooks."""
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import yaml
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from ldm_paper.cli import main
from ldm_paper.presets import PRESETS
from ldm_paper.reproduce import (ManifestError, RunnerBusy, findings_report_path, figure_gallery_markdown, load_manifest, plan,
                                 reproduce, run_paths, verdict_path, write_findings, findings_markdown)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module", autouse=True)
def kernel_of_this_interpreter(tmp_path_factory):
    """papermill's `python3` kernel, pointed at the interpreter running the tests (JUPYTER_PATH comes first)."""
    d = tmp_path_factory.mktemp("jupyter")
    (d / "kernels" / "python3").mkdir(parents=True)
    (d / "kernels" / "python3" / "kernel.json").write_text(json.dumps(dict(
        argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"], display_name="python3", language="python")))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(d) + (os.pathsep + old if old else "")
    yield
    if old is None: os.environ.pop("JUPYTER_PATH")
    else: os.environ["JUPYTER_PATH"] = old


# ---------------------------------------------------------------------------------------------------------------
# a tiny project: notebooks whose cells are given as strings, and a manifest

def _notebook(path, *cells, params='preset = "ci"'):
    nb = new_notebook(cells=[new_markdown_cell(f"# {path.stem}\n\n> a test notebook"),
                             *([new_code_cell(params, metadata={"tags": ["parameters"]})] if params is not None else []),
                             *[new_code_cell(c) for c in cells]],
                      metadata={"kernelspec": {"name": "python3", "display_name": "python3", "language": "python"}})
    nbformat.write(nb, path)


def _writer(name):
    """A notebook body writing figures/<name>_<preset>.txt."""
    return f'open(f"figures/{name}_{{preset}}.txt", "w").write("{name} " + preset)'


def _entry(id, needs=(), notebook=True, **kw):
    p = {"ci": {"preset": "ci"}, "cpu": {"preset": "cpu"}}
    return dict(id=id, notebook=f"nbs/{id}.ipynb" if notebook else None, needs=list(needs), parameters=p,
                outputs=[f"figures/{id}_{{preset}}.txt"], **kw)


def _project(tmp, jobs, figures, notebooks, **top):
    """Write notebooks {id: [cell sources]} and a manifest under `tmp`; returns the manifest path."""
    (tmp / "nbs").mkdir(parents=True, exist_ok=True); (tmp / "figures").mkdir(exist_ok=True)
    for id, cells in notebooks.items(): _notebook(tmp / "nbs" / f"{id}.ipynb", *cells)
    for f in figures: f.setdefault("paper", f"P1 Fig {f['id']}")
    (tmp / "figures" / "manifest.yaml").write_text(yaml.safe_dump(dict(presets=["ci", "cpu"], **top, jobs=jobs, figures=figures), sort_keys=False))
    return tmp / "figures" / "manifest.yaml"


def _run(*args, **kw):
    """`reproduce` with its log captured: (exit status, log text)."""
    out = io.StringIO()
    rc = reproduce(*args, log=lambda s: print(s, file=out), **kw)
    return rc, out.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# the real manifest

def _parameter_names(cell_source):
    import ast
    return {n.targets[0].id if isinstance(n, ast.Assign) else n.target.id for n in ast.parse(cell_source).body}


def _check_fits(path, entry):
    nb = nbformat.read(path, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: {len(tagged)} parameters cells"
    names = _parameter_names(tagged[0].source)
    for preset, params in entry.parameters.items():
        assert set(params) <= names, f"{path.name}: {set(params) - names} (preset {preset}) not in its parameters cell"


def test_real_manifest_matches_the_notebooks():
    m = load_manifest()                                  # raises ManifestError listing every problem
    assert set(m.presets) == set(PRESETS)
    assert m["train"].notebook == "nbs/80_train_family.ipynb" and m["train"].kind == "job"
    names = set()
    for e in m.entries.values():
        assert e.outputs and all("{preset}" in o for o in e.outputs), f"{e.id}: every output must name the preset"
        assert set(e.parameters) == set(PRESETS) and all(p["preset"] == name for name, p in e.parameters.items())
        nb = e.notebook or e.planned_notebook
        assert nb and re.fullmatch(r"nbs/8[0-9][a-z]?_\w+\.ipynb", nb), f"{e.id}: notebook name {nb}"
        assert nb not in names, f"{nb} named twice"; names.add(nb)
        if e.notebook: _check_fits(ROOT / e.notebook, e)
        elif (ROOT / e.planned_notebook).exists():      # written already: switching `notebook:` to it must be one edit
            _check_fits(ROOT / e.planned_notebook, e)
    # each finding is judged by exactly one entry, and every finding by some entry
    claimed = [f for e in m.entries.values() for f in e.findings]
    assert sorted(map(str, claimed)) == sorted(map(str, [1, 2, 3, 4, 5, 6, "p2"]))


# P1's list of figures and tables to regenerate, as in the project's PAPERS.md ("P1 figures and tables to regenerate");
# P2's Fig 4 / Table 2 are added below.
PAPERS_P1_LIST = """
| id | what | series | x | y |
|---|---|---|---|---|
| Table 1 | model family: c, params, GFLOPs, norm. cost, FID, CLIP | all widths | | |
| Fig 1 / 14-16 | sample grid, same prompts and seeds, one row per model | widths | | |
| Fig 3 | pretraining scales with compute | one curve per model (checkpoints over training) | training compute (log) | FID; CLIP |
| Fig 4 / 17 | SR scales with pretraining | one curve per model | SR fine-tune compute | FID; LPIPS (and IS) |
| Fig 5 | SR visuals | widths | | |
| Fig 7 | visuals across CFG scales | 2 widths | | |
| Fig 8 | FID vs steps per CFG + optimal CFG; heat-map of optimal CFG over (model, steps) | 2 widths | steps | FID |
| Fig 9 | sampling efficiency (headline) | one curve per model, best CFG | sampling cost (log) | FID |
| Fig 10 / 21-23 | visuals at equal sampling cost | widths | | |
| Fig 11 | sampler does not change it: DDPM vs DDIM; DPM-Solver++ vs DDIM | per model | sampling cost | FID |
| Fig 12 | SR sampling efficiency, <= 20 steps and > 20 steps | per model | sampling cost | FID |
| Fig 13 | distillation: FID vs model size (undistilled 10/20/50 steps vs distilled 4 steps, acceleration factor); FID vs sampling cost with distilled points | per model | size; cost | FID |
| Fig 19 | progressive-style distillation stages vs undistilled | 2 widths | steps | FID |
"""


def _refs(text, paper="P1"):
    """'Fig 1 / 14-16' -> {('P1', 'Fig', 1), ('P1', 'Fig', 14), ..., ('P1', 'Fig', 16)}; the kind carries forward."""
    out, kind = set(), None
    for k, a, b in re.findall(r"(Fig|Table)?\s*(\d+)(?:-(\d+))?", text):
        kind = k or kind
        out |= {(paper, kind, n) for n in range(int(a), int(b or a) + 1)}
    return out


def test_every_paper_figure_and_table_has_an_entry():
    rows = [l.split("|")[1].strip() for l in PAPERS_P1_LIST.strip().splitlines()[2:]]
    wanted = set().union(*(_refs(r) for r in rows)) | {("P2", "Fig", 4), ("P2", "Table", 2)}
    assert len(rows) == 13 and ("P1", "Fig", 15) in wanted and ("P1", "Table", 1) in wanted
    have = set()
    for e in load_manifest().entries.values():
        if e.paper: have |= _refs(e.paper.split(" ", 1)[1], e.paper.split(" ", 1)[0])
    assert not wanted - have, f"no manifest entry for {sorted(wanted - have)}"


# ---------------------------------------------------------------------------------------------------------------
# validation before any work

def test_manifest_problems_are_all_reported(tmp_path):
    path = _project(tmp_path,
                    jobs=[_entry("a", needs=["c"]), _entry("noparams"), _entry("typo"), dict(_entry("lost"), outputs=["figures/lost.txt"])],
                    figures=[_entry("c", needs=["a"]), _entry("d", needs=["nowhere"], findings=[3]), _entry("e", findings=[3]),
                             dict(_entry("f"), parameters={"ci": {"preset": "ci"}})],
                    notebooks={"a": [_writer("a")], "c": [_writer("c")], "d": [_writer("d")], "e": [_writer("e")],
                               "typo": [_writer("typo")], "f": [_writer("f")], "lost": ["pass"]})
    _notebook(tmp_path / "nbs" / "noparams.ipynb", "x = 1", params=None)
    m = yaml.safe_load(path.read_text()); m["jobs"][2]["parameters"]["cpu"]["seed"] = 3
    path.write_text(yaml.safe_dump(m, sort_keys=False))
    (tmp_path / "nbs" / "lost.ipynb").unlink()
    with pytest.raises(ManifestError) as err: load_manifest(path)
    msg = str(err.value)
    for expected in ["dependency cycle: a -> c -> a", "noparams: ", "0 cells are tagged `parameters`",
                     "typo: parameters ['seed'] (preset 'cpu') are not assigned in the `parameters` cell of nbs/typo.ipynb, which assigns ['preset']",
                     "d: needs unknown entry 'nowhere'", "finding 3 is computed by both d and e",
                     "f: parameters are given for ['ci']; the manifest's presets are ['ci', 'cpu']",
                     "lost: outputs without {preset} in the name", "lost: notebook nbs/lost.ipynb does not exist"]:
        assert expected in msg, f"{expected!r} not in:\n{msg}"


def test_parameters_cell_must_be_literals(tmp_path):
    path = _project(tmp_path, jobs=[_entry("a")], figures=[], notebooks={})
    _notebook(tmp_path / "nbs" / "a.ipynb", _writer("a"), params='import os\npreset = os.environ["P"]')
    with pytest.raises(ManifestError, match="may only assign literals to names; found `import os`"): load_manifest(path)


def test_unknown_preset_or_id_fails_with_the_valid_ones_before_any_work(tmp_path, capsys):
    runs = tmp_path / "runs"
    for argv, msg in [(["--preset", "laptop"], "preset='laptop' is not allowed; choose one of ['ci', 'cpu', 'gpu', 'paper', 'coco256', 'paper-smoke']"),
                      (["--preset", "ci", "--only", "train", "fig99"], "unknown figure or job id 'fig99'; choose from ['encode', 'train', 'distill', 'superres', 'table1'")]:
        with pytest.raises(SystemExit) as e: main(["reproduce", *argv, "--runs-dir", str(runs)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"ldm-paper reproduce: error: {msg}" in err and "Traceback" not in err
    assert not runs.exists()                            # nothing was started


# ---------------------------------------------------------------------------------------------------------------
# running

def test_a_failure_is_reported_with_its_cell_and_the_rest_still_runs(tmp_path):
    path = _project(tmp_path, jobs=[_entry("a"), _entry("bad")],
                    figures=[_entry("c", needs=["bad"]), _entry("d", needs=["a"]), _entry("later", notebook=False)],
                    notebooks={"a": [_writer("a")], "bad": ["import math", "x = math.sqrt(4)\ny = x / 0\n" + _writer("bad")],
                               "c": [_writer("c")], "d": ["text = open(f'figures/a_{preset}.txt').read()\n" + _writer("d")]})
    source = (tmp_path / "nbs" / "bad.ipynb").read_bytes()
    rc, log = _run("ci", manifest=path)
    assert rc == 1
    # the cell (index 3 of the source notebook: title, parameters, import, this), its first line, the line that raised
    assert "bad: FAILED" in log and "cell 3 (`x = math.sqrt(4)`), line 2: `y = x / 0`: ZeroDivisionError: float division by zero" in log
    assert "c: skipped, needs bad" in log and "2 of 4 entries ran, 1 FAILED (bad), 1 skipped" in log
    assert (tmp_path / "figures" / "d_ci.txt").read_text() == "d ci"             # independent entries still ran
    runs = tmp_path / "runs" / "ci"
    assert {p.name for p in runs.glob("*.done.json")} == {"a.done.json", "d.done.json"}
    assert (runs / "bad.ipynb").exists() and (tmp_path / "nbs" / "bad.ipynb").read_bytes() == source   # never in place
    rows = {r["id"]: r for r in __import__("csv").DictReader((runs / "timings.csv").open())}
    assert {k: r["status"] for k, r in rows.items()} == dict(a="ran", bad="failed", c="skipped", d="ran", later="planned")
    assert float(rows["d"]["wall_s"]) > 0 and "ZeroDivisionError" in rows["bad"]["note"] and "needs bad" in rows["c"]["note"]


def test_entries_run_side_by_side_once_what_they_need_is_done(tmp_path):
    """`workers=2`: two independent entries overlap in time, each kernel with cores/2 threads; an entry starts only after
    every entry it needs finished; a failure still skips its dependents; the results are the sequential run's."""
    def timed(name, seconds=3):
        return ("import os, time\nt0 = time.time(); time.sleep(%d)\n" % seconds +
                f"open(f'figures/{name}.times', 'w').write(f'{{t0}} {{time.time()}} {{os.environ.get(\"OMP_NUM_THREADS\")}}')\n" + _writer(name))
    path = _project(tmp_path, jobs=[_entry("a"), _entry("b"), _entry("bad")],
                    figures=[_entry("c", needs=["a", "b"]), _entry("d", needs=["bad"])],
                    notebooks={"a": [timed("a")], "b": [timed("b")], "bad": ["1 / 0"], "c": [timed("c", 0)], "d": [_writer("d")]})
    with pytest.raises(ValueError, match="workers=0: must be an integer >= 1"): _run("ci", manifest=path, workers=0)
    with pytest.raises(ValueError, match="workers=2 applies to executor='local' only"): _run("ci", manifest=path, workers=2, executor="slurm")
    before = os.environ.get("OMP_NUM_THREADS")
    rc, log = _run("ci", manifest=path, workers=2)
    assert os.environ.get("OMP_NUM_THREADS") == before                    # the runner's own setting is restored
    assert rc == 1 and "d: skipped, needs bad" in log and "3 of 5 entries ran, 1 FAILED (bad), 1 skipped" in log, log
    t = {n: (tmp_path / "figures" / f"{n}.times").read_text().split() for n in "abc"}
    (a0, a1, threads), (b0, b1, _), (c0, _, _) = [(float(x), float(y), z) for x, y, z in t.values()]
    assert max(a0, b0) < min(a1, b1), t                                   # a and b overlapped
    assert c0 >= max(a1, b1), t                                           # c waited for both
    assert threads == (before or str(max(1, (os.cpu_count() or 1) // 2)))  # workers x threads = cores (unless set)
    assert (tmp_path / "figures" / "c_ci.txt").read_text() == "c ci"
    assert "to run: 2" in _run("ci", manifest=path, dry_run=True)[1]      # bad and d remain, as after a sequential run


def test_reused_kernels_run_every_entry_in_one_kernel_reset_between_them(tmp_path):
    """`reuse_kernels=True`: the entries share one kernel process, but nothing an entry defines reaches the next, and each
    sees its own progress file; the kernel is shut down at the end. Side by side, each worker keeps its own."""
    from ldm_paper import outputs
    probe = ("import os, json\nopen('figures/NAME.probe', 'w').write(json.dumps(dict(pid=os.getpid(), "
             "leak='leak' in globals(), progress=os.environ.get('LDM_PAPER_PROGRESS'))))\nleak = 1\n")
    path = _project(tmp_path, jobs=[_entry("a"), _entry("b")], figures=[_entry("c", needs=["a"])],
                    notebooks={n: [probe.replace("NAME", n), _writer(n)] for n in "abc"})
    with pytest.raises(ValueError, match="reuse_kernels=True applies to executor='local' only"):
        _run("ci", manifest=path, reuse_kernels=True, executor="slurm")
    rc, log = _run("ci", manifest=path, reuse_kernels=True)
    assert rc == 0, log
    got = {n: json.loads((tmp_path / "figures" / f"{n}.probe").read_text()) for n in "abc"}
    assert len({g["pid"] for g in got.values()}) == 1 and got["a"]["pid"] != os.getpid()       # one kernel for all three
    assert not any(g["leak"] for g in got.values())                                          # reset between entries
    assert [Path(got[n]["progress"]).name for n in "abc"] == [f"{n}.progress.json" for n in "abc"]
    assert outputs._KERNEL == {}                                                             # shut down afterwards
    with pytest.raises(ProcessLookupError): os.kill(got["a"]["pid"], 0)                       # ... really gone
    import threading                                  # no client of it left behind (papermill's keep a heartbeat thread)
    assert not [t for t in threading.enumerate() if type(t).__name__ == "HBChannel" and t.is_alive()]
    rc, log = _run("ci", manifest=path, reuse_kernels=True, workers=2, force=True)
    again = {n: json.loads((tmp_path / "figures" / f"{n}.probe").read_text()) for n in "abc"}
    assert rc == 0 and not any(g["leak"] for g in again.values()) and len({g["pid"] for g in again.values()}) <= 2, log
    assert got["a"]["pid"] not in {g["pid"] for g in again.values()}


def test_an_entry_must_write_its_declared_outputs(tmp_path):
    path = _project(tmp_path, jobs=[_entry("a")], figures=[], notebooks={"a": ["x = 1"]})
    rc, log = _run("ci", manifest=path)
    assert rc == 1 and "did not write its declared outputs ['figures/a_ci.txt']" in log


def test_one_runner_per_preset_at_a_time(tmp_path, capsys):
    import fcntl
    path = _project(tmp_path, jobs=[_entry("a")], figures=[], notebooks={"a": [_writer("a")]})
    (tmp_path / "runs" / "ci").mkdir(parents=True)
    with open(tmp_path / "runs" / "ci" / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)                  # as another runner would hold it
        with pytest.raises(RunnerBusy, match="another `ldm-paper reproduce` is running on"): _run("ci", manifest=path)
        assert main(["reproduce", "--preset", "ci", "--manifest", str(path)]) == 2
        assert "ldm-paper reproduce: error: another" in capsys.readouterr().err
    assert not (tmp_path / "figures" / "a_ci.txt").exists()


def test_done_markers_follow_parameters_and_notebook_sources(tmp_path):
    path = _project(tmp_path, jobs=[_entry("a")], figures=[_entry("b", needs=["a"])],
                    notebooks={"a": [_writer("a")], "b": [_writer("b")]})
    assert _run("ci", manifest=path)[0] == 0
    actions = lambda **kw: [s.action for s in plan(load_manifest(path), "ci", **kw)]
    assert actions() == ["done", "done"]
    assert actions(only=["b"], force=True) == ["done", "run"]             # --force: the selected entries only
    nb = nbformat.read(tmp_path / "nbs" / "a.ipynb", as_version=4)       # outputs, ids, metadata: still done
    nb.cells[2].outputs = [nbformat.v4.new_output("stream", text="hi\n")]; nb.cells[2].execution_count = 4
    nbformat.write(nb, tmp_path / "nbs" / "a.ipynb")
    assert actions() == ["done", "done"]
    nb.cells[2].source += "\n# changed"; nbformat.write(nb, tmp_path / "nbs" / "a.ipynb")
    assert actions() == ["run", "run"]                                    # the figure depends on the job's key
    assert plan(load_manifest(path), "cpu")[0].reason == "never run at this preset"


def test_done_markers_follow_the_preset_settings(tmp_path, monkeypatch):
    path = _project(tmp_path, jobs=[_entry("a")], figures=[_entry("b", needs=["a"])],
                    notebooks={"a": [_writer("a")], "b": [_writer("b")]})
    assert _run("ci", manifest=path)[0] == 0
    assert [s.action for s in plan(load_manifest(path), "ci")] == ["done", "done"]
    monkeypatch.setitem(PRESETS["ci"]["distill"], "updates_per_stage", 7)   # a preset value, not a manifest parameter
    steps = plan(load_manifest(path), "ci")
    assert [s.action for s in steps] == ["run", "run"]
    assert "preset's settings" in steps[0].reason


def test_killed_runner_resumes_without_redoing_finished_entries(tmp_path):
    slow = 'import os, time\nopen("started", "w").write(str(os.getpid()))\nt = time.time()\nwhile os.path.exists("hold") and time.time() - t < 120: time.sleep(0.2)\n'
    path = _project(tmp_path, jobs=[_entry("a"), _entry("b")], figures=[_entry("c", needs=["a"])],
                    notebooks={"a": [_writer("a")], "b": [_writer("b")], "c": [slow + _writer("c")]})
    (tmp_path / "hold").touch()
    cmd = [str(BIN / "ldm-paper"), "reproduce", "--preset", "ci", "--manifest", str(path)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t = time.time()
        while not (tmp_path / "started").exists():
            assert proc.poll() is None and time.time() - t < 180, "the runner stopped before reaching the slow notebook"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL); proc.wait()
    kernel = int((tmp_path / "started").read_text())
    runs = tmp_path / "runs" / "ci"
    finished = {i: (runs / f"{i}.done.json").stat().st_mtime_ns for i in ("a", "b")}
    executed = {i: (runs / f"{i}.ipynb").stat().st_mtime_ns for i in ("a", "b")}
    assert not (runs / "c.done.json").exists()
    # the orphaned kernel notices its parent is gone and exits; if not, end it (we started it)
    for _ in range(50):
        if not Path(f"/proc/{kernel}").exists(): break
        time.sleep(0.2)
    else: os.kill(kernel, signal.SIGKILL)

    (tmp_path / "hold").unlink()
    rc, log = _run("ci", manifest=path)
    assert rc == 0 and "[1/1] c:" in log
    assert {i: (runs / f"{i}.done.json").stat().st_mtime_ns for i in ("a", "b")} == finished
    assert {i: (runs / f"{i}.ipynb").stat().st_mtime_ns for i in ("a", "b")} == executed
    assert (runs / "c.done.json").exists() and (tmp_path / "figures" / "c_ci.txt").read_text() == "c ci"


def test_submitit_local_executor_runs_the_plan(tmp_path):
    slurm = dict(timeout_min=5, gpus_per_node=0, cpus_per_task=1, mem_gb=1, slurm_partition="nowhere")   # slurm_* ignored off SLURM
    path = _project(tmp_path, jobs=[_entry("a")], figures=[_entry("b", needs=["a"], slurm={"timeout_min": 3})],
                    notebooks={"a": [_writer("a")], "b": ["text = open(f'figures/a_{preset}.txt').read()\n" + _writer("b")]}, slurm=slurm)
    rc, log = _run("ci", manifest=path, executor="slurm", cluster="local", poll_s=0.3)
    assert rc == 0, log
    assert re.search(r"\[1/2\] a: submitted as local job \d+", log) and re.search(r"\[2/2\] b: submitted as local job", log)
    assert log.index("a: ok in") < log.index("b: submitted")            # b waited for a
    runs = tmp_path / "runs" / "ci"
    assert (runs / "a.done.json").exists() and (runs / "b.done.json").exists() and any((runs / "submitit").glob("*_log.out"))
    assert "to run: 0" in _run("ci", manifest=path, executor="slurm", cluster="local")[1]


def test_a_time_limit_the_checkpoint_signal_may_precede_is_refused_before_submitting(tmp_path):
    """SLURM may signal up to 60 s before `slurm_signal_delay_s` asks: a 1-minute job with a 40-s delay may be signalled
    in its first second and die; the runner refuses it in the plan, naming both settings, and accepts 2 minutes / 30 s."""
    from ldm_paper.reproduce import check_signal_time
    with pytest.raises(ManifestError, match=r"timeout_min=1 with slurm_signal_delay_s=40.*slurm_signal_delay_s <= 60\*timeout_min - 90"):
        check_signal_time(dict(timeout_min=1, slurm_signal_delay_s=40), "long at ci")
    with pytest.raises(ManifestError, match="slurm_signal_delay_s=90"):      # submitit's default delay under a 2-minute limit
        check_signal_time(dict(timeout_min=2))
    check_signal_time(dict(timeout_min=2, slurm_signal_delay_s=30)); check_signal_time(dict(timeout_min=3)); check_signal_time({})
    path = _project(tmp_path, jobs=[_entry("a")], figures=[], notebooks={"a": [_writer("a")]},
                    slurm=dict(timeout_min=1, cpus_per_task=1, mem_gb=1, slurm_signal_delay_s=40))
    with pytest.raises(ManifestError, match="a at ci: timeout_min=1"):
        _run("ci", manifest=path, executor="slurm", cluster="local", poll_s=0.3)
    assert not (tmp_path / "runs" / "ci" / "submitit").exists() or not any((tmp_path / "runs" / "ci" / "submitit").iterdir())


def test_dry_run_prints_the_plan_and_the_paper_family(tmp_path, capsys):
    assert main(["reproduce", "--preset", "paper", "--dry-run", "--executor", "slurm", "--runs-dir", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^1\s+encode\s+job\s+run\s+-\s+\{\"preset\": \"paper\", \"num_processes\": 8\}\s+nbs/80_encode.ipynb", out, re.M)
    assert re.search(r"^2\s+train\s+job\s+run\s+-\s+\{\"preset\": \"paper\", \"num_processes\": 8\}\s+nbs/80_train_family.ipynb", out, re.M)
    # submitit parameters per entry and per preset: the paper training job gets a node of 8 GPUs, the others one GPU
    assert '"timeout_min": 4320' in out and '"gpus_per_node": 8' in out and '"gpus_per_node": 1' in out
    rows = {int(r[0]): r for r in (l.split() for l in out.splitlines()) if len(r) == 6 and r[0].isdigit() and r[1][0].isdigit()}
    assert sorted(rows) == list(PRESETS["paper"]["widths"])
    c, params_m, gflops, norm_cost, steps, compute = rows[320]
    assert (params_m, norm_cost) == ("859.5", "1.0") and float(gflops) == pytest.approx(803.3, abs=0.1)  # SD v1.5's UNet (README)
    assert float(compute) == pytest.approx(float(gflops) * 500_000, rel=1e-3) and steps == "500000"
    assert float(rows[64][1]) < float(rows[96][1]) < float(rows[768][1]) and not (tmp_path / "runs").exists()
    # the memory plan on 8 x 80 GB: every width fits; the smallest in plain DDP, the largest sharded with checkpointing
    plan = {int(r[0]): r for r in (l.split() for l in out[out.index("memory plan per width"):].splitlines()) if len(r) == 13 and r[0].isdigit()}
    assert sorted(plan) == list(PRESETS["paper"]["widths"])
    assert plan[64][4:6] == ["DDP", "False"] and plan[768][4:7] == ["FSDP", "True", "host"]
    for r in plan.values():
        assert int(r[7]) * int(r[8]) == 2048 // 8 and float(r[11]) <= 80 * 0.9
    # activations scaled by what the committed GPU check measured on a device (1.0 where none did)
    from ldm_paper.bench import read_gpu_check
    from ldm_paper.train import measured_activation_scale
    measured = [r for r in read_gpu_check() if r["scale"] == "paper"]
    want = measured_activation_scale(measured) if measured else 1.0
    assert {float(r[12]) for r in plan.values()} == {want} and want >= 1


def test_paper_widths_train_with_their_planned_micro_batch():
    from ldm_paper.experiment import train_config
    small, large = train_config("paper", 64), train_config("paper", 768)
    assert (small.micro_batch, small.grad_checkpointing, small.ema_offload) == (256, False, False)
    assert large.grad_checkpointing and large.ema_offload and 2048 // 8 % large.micro_batch == 0
    assert small.mixed_precision == large.mixed_precision == "bf16" and small.batch_size == large.batch_size == 2048


# ---------------------------------------------------------------------------------------------------------------
# findings and the gallery

def test_findings_report_and_gallery(tmp_path):
    path = _project(tmp_path, jobs=[_entry("a")], figures=[_entry("fig", findings=[3], title="A figure"),
                                                            _entry("later", notebook=False, findings=[6], title="Later")],
                    notebooks={"a": [_writer("a")], "fig": [_writer("fig")]})
    m = load_manifest(path)
    v = dict(finding=3, claim="small wins", paper="83M best at cost 3", ours="c=16 best at cost 2 (FID 12.0 vs 15.0)",
             verdict="partly", source="fig")
    verdict_path(3, "cpu", tmp_path).parent.mkdir(parents=True, exist_ok=True)
    verdict_path(3, "cpu", tmp_path).write_text(json.dumps(v))
    verdict_path(1, "cpu", tmp_path).write_text(json.dumps(dict(v, finding=1, verdict="yes")))
    report = write_findings("cpu", m)
    assert report == findings_report_path("cpu", tmp_path) == tmp_path / "figures" / "FINDINGS.md"
    text = report.read_text()
    assert "| finding | verdict | network A | network B | source |" in text
    assert "| 3. Smaller models sample more efficiently | **partly** | - | - | fig |" in text      # an old file: no networks
    assert "- **Ours (`cpu`).** c=16 best at cost 2 (FID 12.0 vs 15.0)" in text and "- **Rule.**" not in text
    assert "| 6. Distillation does not change the trend | **not run yet** | - | - | later (planned: None) |" in text
    assert "**invalid verdict file**" in text and "verdict='yes'" in text
    assert text.count("**not run yet**") == 5                            # 2, 4, 5, 6 and P2
    assert write_findings("ci", m).name == "FINDINGS_ci.md"
    net = lambda x, ours: dict(v, verdict=x, ours=ours)
    verdict_path(3, "cpu", tmp_path).write_text(json.dumps(dict(
        v, verdict="inconclusive", rule="Budgets as budgets; 1.96 sd decides.",
        ours="Networks disagree. network A (fid) [reproduces]: c=16 2.6 ± 0.1 beats c=24 3.1 ± 0.1",
        by_net=dict(fid=net("reproduces", "c=16 2.6 ± 0.1"), fid_b=net("does not reproduce", "c=24 2.0 ± 0.1")))))
    text = write_findings("cpu", m).read_text()
    assert "| 3. Smaller models sample more efficiently | **inconclusive** | reproduces | does not reproduce | fig |" in text
    assert "- **Verdict.** inconclusive (network A: reproduces; network B: does not reproduce; source: fig)" in text
    assert "- **Rule.** Budgets as budgets; 1.96 sd decides." in text and "c=16 2.6 ± 0.1 beats" in text
    verdict_path(3, "cpu", tmp_path).write_text(json.dumps(dict(v, by_net=dict(fid=dict(verdict="sure")))))
    assert "- **Verdict.** invalid verdict file" in findings_markdown("cpu", m).split("## 3.")[1]
    (tmp_path / "figures" / "fig_cpu.md").write_text("| t |")
    m.entries["fig"].outputs += ("figures/fig_{preset}.md",)
    g = figure_gallery_markdown("cpu", m)
    assert "| fig | P1 Fig fig | A figure | [fig_cpu.md](figures/fig_cpu.md) |" in g
    assert "| later | P1 Fig later | Later | planned |" in g
    m.entries["fig"].outputs = m.entries["fig"].outputs[:1]
    assert "not run yet (`ldm-paper reproduce --preset cpu --only fig`)" in figure_gallery_markdown("cpu", m)


# ---------------------------------------------------------------------------------------------------------------
# the real train job at the ci preset

def test_real_train_job_runs_then_is_skipped_quickly(tmp_path):
    rc, log = _run("ci", only=["train"], runs_dir=tmp_path / "runs")
    assert rc == 0 and "train: ok in" in log, log
    executed = tmp_path / "runs" / "ci" / "train.ipynb"
    nb = nbformat.read(executed, as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)
    assert (ROOT / "figures" / "train_loss_ci.png").stat().st_size > 10_000
    t = time.time()
    rc, log = _run("ci", only=["train"], runs_dir=tmp_path / "runs")
    assert rc == 0 and "to run: 0" in log and time.time() - t < 5
    assert executed.stat().st_mtime_ns == run_paths(tmp_path / "runs", "ci", "train")[0].stat().st_mtime_ns


def test_a_long_entry_logs_its_progress_and_no_kernel_warnings(tmp_path, monkeypatch, capfd):
    """While an entry runs, the runner prints its latest `report_progress` record every PROGRESS_EVERY_S seconds
    (here 0.5 s) with the elapsed time and the manifest's estimate; the kernel's transport warning is not printed."""
    import ldm_paper.reproduce as R
    monkeypatch.setattr(R, "PROGRESS_EVERY_S", 0.5)
    body = ("import time\nfrom ldm_paper.core import report_progress\n"
            "for k in range(1, 5):\n    report_progress(f'evaluate step {k}', k, 4, every_s=0); time.sleep(0.6)\n" + _writer("slow"))
    path = _project(tmp_path, jobs=[_entry("slow", estimate_minutes={"ci": 3, "cpu": 3})], figures=[], notebooks={"slow": [body]})
    rc, log = _run("ci", manifest=path)
    assert rc == 0, log
    lines = [l for l in log.splitlines() if l.strip().startswith("slow: 00:00:0")]
    assert len(lines) >= 3 and any("of about 3 min; evaluate step" in l and "/4" in l for l in lines), log
    assert "without encryption" not in log + "".join(capfd.readouterr())   # the kernel writes to the inherited stderr


def test_findings_report_flags_an_evaluation_network_below_the_accuracy_bar(monkeypatch):
    import ldm_paper.metrics as M
    from ldm_paper.reproduce import _evalnet_markdown
    metas = {"a": dict(arch="plain", feature_dim=128, steps=2400, test_accuracy=0.913),
             "b": dict(arch="residual", feature_dim=128, steps=600, test_accuracy=0.851)}
    monkeypatch.setattr(M, "eval_net_meta", lambda preset, which="a": metas[which])
    text = "\n".join(_evalnet_markdown("cpu"))
    a, b = [l for l in text.splitlines() if l.startswith("  - network")]
    assert "0.913, at least 0.90 is required" in a and "below" not in a
    assert "0.851, **below 0.90" in b and "not evidence" in b
