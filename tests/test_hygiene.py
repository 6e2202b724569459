"""Notebook hygiene: clean notebooks, one module per library notebook, documented exports, papermill tags kept."""
import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = sorted((ROOT / "nbs").glob("*.ipynb"))
BIN = Path(sys.executable).parent


def _cells(nb_path):
    return nbformat.read(nb_path, as_version=4).cells


def _default_exp(nb_path):
    for c in _cells(nb_path):
        m = re.search(r"^#\|\s*default_exp\s+(\S+)", c.source, re.M) if c.cell_type == "code" else None
        if m: return m.group(1)


LIBRARY = [p for p in NBS if _default_exp(p)]


# index.ipynb is exempt: it is the course's home page (nbdev's docs home, index.html), neither a library notebook nor a
# figure notebook that papermill runs, so it has no default_exp and no `parameters` cell (test_index_notebook_layout)
FIGURE_NBS = [p for p in NBS if not _default_exp(p) and p.name != "index.ipynb"]   # figure and job notebooks, run by papermill


def test_there_are_library_notebooks():
    assert {"core", "data", "family", "cli"} <= {_default_exp(p) for p in LIBRARY}


@pytest.mark.parametrize("nb", NBS, ids=lambda p: p.name)
def test_notebook_is_clean(nb):
    raw = json.loads(nb.read_text())
    for c in raw["cells"]:
        if c["cell_type"] != "code": continue
        assert c.get("execution_count") is None, f"{nb.name}: execution counts left in"
        assert set(c.get("metadata", {})) <= {"tags"}, f"{nb.name}: cell metadata {c['metadata']}"
    size = nb.stat().st_size
    assert size < 300_000, f"{nb.name} is {size} bytes: outputs too large to commit"


@pytest.mark.parametrize("nb", LIBRARY, ids=lambda p: p.name)
def test_library_notebook_layout(nb):
    """default_exp first, then a title with a one-line subtitle; its module exists and is generated from it."""
    cells = _cells(nb)
    assert cells[0].source.strip().startswith("#| default_exp"), f"{nb.name}: first cell must be #| default_exp"
    title = cells[1].source
    assert cells[1].cell_type == "markdown" and title.startswith("# ") and "\n> " in title, f"{nb.name}: title + subtitle"
    mod = ROOT / "ldm_paper" / (_default_exp(nb).replace(".", "/") + ".py")
    assert mod.exists() and f"File to edit: ../nbs/{nb.name}" in mod.read_text()


@pytest.mark.parametrize("nb", FIGURE_NBS, ids=lambda p: p.name)
def test_figure_notebook_layout(nb):
    """No default_exp: a title with a one-line subtitle first, exactly one `parameters` cell of literals, no exports."""
    cells = _cells(nb)
    assert cells[0].cell_type == "markdown" and cells[0].source.startswith("# ") and "\n> " in cells[0].source, \
        f"{nb.name}: the first cell must be the title with a subtitle"
    tagged = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0].cell_type == "code", f"{nb.name}: {len(tagged)} cells tagged `parameters`, needs one"
    for node in ast.parse(tagged[0].source).body:
        assert isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None, \
            f"{nb.name}: the parameters cell may only assign values: {ast.unparse(node)}"
        ast.literal_eval(node.value)                    # literals only: papermill overrides them, a reader sees them
    exports = [c.source.splitlines()[0] for c in cells if c.cell_type == "code" and re.search(r"^#\|\s*export", c.source, re.M)]
    assert not exports, f"{nb.name}: a figure notebook exports nothing (it has no default_exp): {exports}"


def test_index_notebook_layout():
    """The home page: a title with a subtitle first, no exports, no `parameters` cell."""
    cells = _cells(ROOT / "nbs" / "index.ipynb")
    assert cells[0].cell_type == "markdown" and cells[0].source.startswith("# ") and "\n> " in cells[0].source
    assert not [c for c in cells if c.cell_type == "code" and re.search(r"^#\|\s*(default_exp|export)", c.source, re.M)]
    assert not [c for c in cells if "parameters" in c.metadata.get("tags", [])]


@pytest.mark.parametrize("nb", LIBRARY, ids=lambda p: p.name)
def test_exported_names_have_docstrings(nb):
    mod = ROOT / "ldm_paper" / (_default_exp(nb).replace(".", "/") + ".py")
    tree = ast.parse(mod.read_text())
    missing = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))
               and not n.name.startswith("_") and not ast.get_docstring(n)]
    assert not missing, f"{mod.name}: exported names without a docstring: {missing}"


def test_no_machine_paths_committed():
    pattern = re.compile(r"/(work|tmp|root|home)/[A-Za-z]")
    for p in [*NBS, *(ROOT / "ldm_paper").glob("*.py"), ROOT / "Makefile", ROOT / "settings.ini"]:
        hits = [l for l in p.read_text().splitlines() if pattern.search(l)]
        assert not hits, f"{p.name} names a machine path: {hits[:2]}"


def test_parameters_tag_survives_nbdev_clean(tmp_path):
    """settings.ini must keep papermill's `parameters` tag (allowed_cell_metadata_keys = tags)."""
    shutil.copy(ROOT / "settings.ini", tmp_path)
    (tmp_path / "nbs").mkdir()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# t"),
                                         nbformat.v4.new_code_cell("steps = [4, 8]", metadata={"tags": ["parameters"], "collapsed": True}),
                                         nbformat.v4.new_code_cell("print(steps)", execution_count=3)])
    nb.cells[2].outputs = [nbformat.v4.new_output("stream", text="[4, 8]\n")]
    nbformat.write(nb, tmp_path / "nbs" / "fig.ipynb")
    subprocess.run([str(BIN / "nbdev_clean"), "--fname", "nbs/fig.ipynb"], cwd=tmp_path, check=True)
    cleaned = nbformat.read(tmp_path / "nbs" / "fig.ipynb", as_version=4)
    assert cleaned.cells[1].metadata == {"tags": ["parameters"]}       # tag kept, other metadata stripped
    assert cleaned.cells[2].execution_count is None                    # and the notebook really was cleaned


def test_ci_runs_the_readme_test_command():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make reproduce" in readme
    assert re.search(r"^make test$", ci, re.M)


@pytest.mark.parametrize("nb_path", NBS, ids=lambda p: p.name)
def test_no_cell_mixes_imports_with_other_code(nb_path):
    """nbdev's doc build (nbdev_docs / nbdev_proc_nbs) executes every cell that contains an import, without the cells
    before it: a cell that also uses earlier variables (a figure notebook's `preset`, a lesson's data) fails the site
    build where Quarto exists. Imports live in cells of their own (or in exported cells)."""
    bad = []
    for i, c in enumerate(_cells(nb_path)):
        if c.cell_type != "code" or re.search(r"^#\|\s*(export|exports|exporti|exec_doc|default_exp)\b", c.source, re.M): continue
        try: tree = ast.parse("\n".join("#" + l if l.startswith(("%", "!")) else l for l in c.source.splitlines()))
        except SyntaxError: continue
        has_import = any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(tree))
        if has_import and not all(isinstance(t, (ast.Import, ast.ImportFrom)) for t in tree.body): bad.append(i)
    assert not bad, f"{nb_path.name}: cells {bad} mix imports with other code; move the imports to a cell of their own"


def _outputs(nb_path):
    return [(i, o) for i, c in enumerate(_cells(nb_path)) if c.cell_type == "code" for o in c.get("outputs", [])]


@pytest.mark.parametrize("nb", [p for p in NBS if any(c.cell_type == "code" for c in _cells(p))], ids=lambda p: p.name)
def test_notebook_is_committed_with_its_ci_outputs(nb):
    """`make outputs` wrote what the notebook shows at ci (readable without running it); `make test` checks that a
    fresh execution gives the same (ldm-paper outputs --check), so here only: there are outputs, and no traceback."""
    outs = _outputs(nb)
    assert outs, f"{nb.name} has no outputs: run `make outputs` (ldm-paper outputs {nb.stem}) and commit it"
    assert not [i for i, o in outs if o.output_type == "error"], f"{nb.name}: committed with an error output"
    assert not [i for i, o in outs if o.output_type == "stream" and o.name == "stderr"], f"{nb.name}: stderr committed"


@pytest.mark.parametrize("name", ["52_experiment", "55_sampling", "60_distill", "61_consistency"])
def test_sampling_lessons_show_samples(name):
    assert [i for i, o in _outputs(ROOT / "nbs" / f"{name}.ipynb") if "image/png" in o.get("data", {})], \
        f"{name}: no image among the committed outputs"


@pytest.mark.parametrize("nb", [p for p in FIGURE_NBS if "show_committed(" in p.read_text()], ids=lambda p: p.name)
def test_figure_notebook_shows_the_committed_cpu_figure(nb):
    """A figure notebook displays its committed cpu figure (or table) and the paper's numbers beside ours."""
    cells = _cells(nb)
    shown = [i for i, o in _outputs(nb) if "show_committed(" in cells[i].source
             and {"image/png", "text/markdown"} & set(o.get("data", {}))]
    assert shown, f"{nb.name}: the committed cpu figure is not among the committed outputs"
    papers = [i for i, o in _outputs(nb) if "paper_table(" in cells[i].source]
    assert papers or "paper_table(" not in nb.read_text(), f"{nb.name}: the paper's numbers are not among the outputs"
