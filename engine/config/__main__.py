"""`python -m engine.config [CONFIG [--set ...]]` prints the resolved config; `--reference` the key reference."""

from __future__ import annotations

import sys

from engine.config import load_config, reference_markdown, to_toml


def main(argv: list[str]) -> int:
    """Print the reference (`--reference`) or the resolved config of `argv[0]` with overrides `argv[1:]`."""
    if argv[:1] == ["--reference"]:
        print(reference_markdown())
        return 0
    path = argv[0] if argv else None
    print(to_toml(load_config(path, argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
