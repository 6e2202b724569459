import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT



LONGEST, QUICK = "tests/test_smoke.py", "tests/test_findings.py"
# Seconds per file alone on 2 cores (`pytest tests -n 2 --dist loadfile --durations=80`, summed per file): the slow
# files are handed out first, so that no worker starts a long file just as the others run out of work.
SLOW_FILES = {"tests/test_shards.py": 145, "tests/test_train.py": 139, "tests/test_docs_browser.py": 80,
              "tests/test_reproduce.py": 119, "tests/test_experiment.py": 108, "tests/test_distill.py": 93,
              "tests/test_bench.py": 60, "tests/test_evaluate.py": 57, "tests/test_presets.py": 34, "tests/test_family.py": 25}


def pytest_collection_modifyitems(items):
    """Collect the paper-path smoke test (the longest file) first, the other slow files next, slowest first, and a quick
    file right after the first of each worker's files. `make test` runs pytest-xdist with `--dist loadfile
    --no-loadscope-reorder`, which hands out files in collection order: one to each of the n workers, then, at the
    start and whenever a worker has at most two tests waiting, the next one. The smoke file has only two tests, so its
    worker is given file n+1 at once and runs it only after the smoke test: that is the quick file. The other workers
    share everything else, slow files first. (By default xdist sorts files by their number of tests, and the smoke
    test, which has few, would be handed out last and run alone.)"""
    files = list(dict.fromkeys(item.nodeid.split("::")[0] for item in items))
    if LONGEST not in files: return
    n = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    rest = sorted((f for f in files if f not in (LONGEST, QUICK)), key=lambda f: -SLOW_FILES.get(f, 0))   # stable
    order = [LONGEST] + rest[:n - 1] + ([QUICK] if QUICK in files else []) + rest[n - 1:]
    items.sort(key=lambda item: order.index(item.nodeid.split("::")[0]))
