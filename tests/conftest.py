import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


def pytest_collection_modifyitems(config, items):
    """The longest file first (the paper path at toy size, ~8 min): with `-n 2 --dist loadfile` one worker runs it while
    the other goes through every other file, instead of it starting last, alone."""
    items.sort(key=lambda item: Path(item.fspath).name != "test_smoke.py")
