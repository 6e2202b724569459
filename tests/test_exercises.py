"""The student notebooks hold no answers: every check cell is `check_answer("<lesson>.<N>", answer_N)` and nothing
else, every exercise has a stored key and a worked solution in the teacher's notebook, and a check says "not
answered" for None, never "right"."""
import json
import re
from pathlib import Path

import nbformat

from ldm_paper.docs import SOLUTIONS, check_answer, exercise_keys, grade

ROOT = Path(__file__).resolve().parents[1]
LESSONS = ["10_data", "20_family", "30_autoencoder", "40_diffusion", "55_sampling", "56_metrics", "60_distill", "61_consistency"]


def _cells(name):
    return nbformat.read(ROOT / "nbs" / f"{name}.ipynb", as_version=4).cells


def test_every_check_cell_is_only_the_check_and_every_exercise_has_a_key_and_a_solution():
    keys, solutions = exercise_keys(), "\n".join(c.source for c in _cells(SOLUTIONS[:-6]))
    seen = set()
    for lesson in LESSONS:
        checks = [c.source for c in _cells(lesson) if c.cell_type == "code" and "check_answer(" in c.source and "import" not in c.source]
        assert checks, lesson
        for s in checks:
            m = re.fullmatch(r'check_answer\("(%s\.(\d+))", answer_(\d+)\)' % re.escape(lesson), s.strip())
            assert m and m.group(2) == m.group(3), (lesson, s)          # nothing but the check: no expression for the truth
            seen.add(m.group(1))
            assert f'solve("{m.group(1)}"' in solutions, m.group(1)
    assert seen == set(keys), sorted(seen ^ set(keys))


def test_not_answered_is_never_a_pass_and_a_wrong_answer_shows_no_truth(capsys):
    for ex in exercise_keys():
        assert grade(ex, None) is None
        assert check_answer(ex, None) is None
        assert check_answer(ex, "certainly not the answer") is False
    out = capsys.readouterr().out
    assert "Not answered yet" in out and "Not right" in out and "Right." not in out


def test_keys_hold_no_answer_in_the_clear():
    for ex, k in exercise_keys().items():
        assert set(k) <= {"kind", "decimals", "sha256", "hint", "lo", "hi"}, ex
        if k["kind"] == "hash": assert re.fullmatch(r"[0-9a-f]{64}", k["sha256"]), ex
