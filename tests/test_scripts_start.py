"""Every script in scripts/ starts: its imports resolve and `--help` exits 0.

scripts/train_toy_world.py imported `write_sha256sums` from a module that no longer had it (moved to engine/files.py
in the house refactor) and nothing noticed: the scripts are run by hand, when weights are retrained.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (REPO / "scripts").glob("*.py") if not p.name.startswith("_"))

# One interpreter for all of them (torch and diffusers import once): run each as __main__ with `--help`.
PROBE = """
import runpy, sys
bad = []
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    try:
        runpy.run_path(path, run_name="__main__")
        bad.append(f"{path}: --help returned without exiting")
    except SystemExit as e:
        if e.code not in (0, None):
            bad.append(f"{path}: exit {e.code}")
    except Exception as e:
        bad.append(f"{path}: {type(e).__name__}: {e}")
print("\\n".join(bad))
sys.exit(1 if bad else 0)
"""


def test_every_script_starts() -> None:
    assert len(SCRIPTS) >= 5, SCRIPTS
    r = subprocess.run([sys.executable, "-c", PROBE, *map(str, SCRIPTS)], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
