import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT



LONGEST, QUICK = "tests/test_smoke.py", "tests/test_findings.py"


def pytest_collection_modifyitems(items):
    """Collect the paper-path smoke test (about a third of the suite's time) first and a quick file third: `make test`
    runs pytest-xdist with `--dist loadfile --no-loadscope-reorder`, which hands out files in collection order, two to
    each worker at the start (1st and 3rd to one, 2nd and 4th to the other), and more to a worker only once it has at
    most two tests waiting. So one worker starts the smoke test at once with only the quick file queued behind it, and
    the other runs everything else; by default the smoke test, which has few tests, is handed out last and runs alone."""
    files = list(dict.fromkeys(item.nodeid.split("::")[0] for item in items))
    if LONGEST not in files: return
    rest = [f for f in files if f not in (LONGEST, QUICK)]
    order = [LONGEST] + rest[:1] + ([QUICK] if QUICK in files else []) + rest[1:]
    items.sort(key=lambda item: order.index(item.nodeid.split("::")[0]))
