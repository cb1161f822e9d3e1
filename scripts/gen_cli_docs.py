"""Regenerate docs/cli.md from the typed configs: `python scripts/gen_cli_docs.py`."""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

from loopfit.cli import _commands, main
from loopfit.io import atomic_file


def _help(args: list[str]) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        main([*args, "--help"])
    return buf.getvalue().rstrip()


def render() -> str:
    parts = [
        "# CLI reference",
        "",
        "Generated from the typed functions and dataclass configs behind each subcommand by",
        "`python scripts/gen_cli_docs.py`; every flag's text is the docstring of its field. Flags use underscores;",
        "booleans are given as `--flag=true`; nested configs as `--lora.r=16` or in a YAML file (`--config`).",
        "",
    ]
    for name in _commands():
        parts += [f"## loopfit {name}", "", "```", _help([name]), "```", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    sys.argv[0] = "loopfit"
    out = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
    with atomic_file(out) as f:
        f.write(render() + "\n")
    print(f"wrote {out}")
