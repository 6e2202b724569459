"""Fail when `nbdev_export` or `nbdev_clean` changes a file under nbs/ or ldm_paper/.

Snapshots both folders, runs the two commands in place, and reports every file they changed. Uncommitted work that
is already in sync passes; a notebook edited without re-exporting, or committed with outputs and metadata that
nbdev_clean strips, fails. Run: `python tests/nbdev_sync.py` from the repository root.
"""
import hashlib, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WATCHED = ("nbs", "ldm_paper")


def snapshot() -> dict:
    out = {}
    for d in WATCHED:
        for p in sorted((ROOT / d).rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts and ".ipynb_checkpoints" not in p.parts:
                out[str(p.relative_to(ROOT))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def main() -> int:
    bindir = Path(sys.executable).parent
    before = snapshot()
    for cmd in ("nbdev_export", "nbdev_clean"):
        subprocess.run([str(bindir / cmd)], cwd=ROOT, check=True)
    after = snapshot()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if changed:
        print("nbdev sync check FAILED: nbdev_export / nbdev_clean changed these files "
              "(they are now rewritten; review with `git diff` and commit them):")
        for k in changed: print("  ", k, "(new)" if k not in before else "(removed)" if k not in after else "")
        return 1
    print(f"nbdev sync check: {len(after)} files under {', '.join(WATCHED)} unchanged by nbdev_export and nbdev_clean")
    return 0


if __name__ == "__main__":
    sys.exit(main())
