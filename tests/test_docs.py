from __future__ import annotations

import re
from pathlib import Path

from engine.config import reference_markdown

REPO = Path(__file__).resolve().parents[1]


def test_config_reference_is_current() -> None:
    assert (REPO / "docs" / "config.md").read_text() == reference_markdown() + "\n", (
        "regenerate: python -m engine.config --reference > docs/config.md"
    )


def test_readme_quick_start_is_two_commands_and_ci_runs_its_test_command() -> None:
    readme = (REPO / "README.md").read_text()
    block = re.search(r"## Quick start\s+```bash\n(.*?)```", readme, re.S)
    assert block is not None
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.split("#")[0].strip()]
    assert commands == ["make demo", "make test"]
    assert "make test" in (REPO / ".ci" / "run").read_text()
