"""The ``minift`` command: ``minift <recipe or tool> [flags]`` runs that script, as ``python recipes/sft.py``
would, in this process.

    minift sft --max_steps 2                          # = python recipes/sft.py --max_steps 2
    minift generate tiny --prompt "Reverse the words: red cup"
    accelerate launch --num_processes 2 -m minift sft # several processes: Accelerate's launcher runs this module

One process needs no launcher, so nothing prints but the run's own output, and an error is one ``error:`` line.
The scripts are the readable files in ``recipes/`` and ``tools/``, installed with the package as
``minift.recipes`` and ``minift.tools``."""

from __future__ import annotations

import ast
import difflib
import importlib.util
import runpy
import sys
from pathlib import Path

# Tools under a shorter command name than their file's.
TOOL_NAMES = {"generate": "generate", "evaluate": "evaluate", "serve": "serve", "convert": "convert_to_gguf",
              "merge": "merge_adapter"}


def _folder(package: str) -> Path:
    # find_spec, not minift's own folder: an editable install maps these packages to the checkout's recipes/ and tools/.
    return Path(importlib.util.find_spec(package).submodule_search_locations[0])


def commands() -> dict[str, Path]:
    """Every command name and the script it runs: each recipe by its file name, then the tools."""
    recipes = {p.stem: p for p in sorted(_folder("minift.recipes").glob("*.py")) if p.stem != "__init__"}
    tools = _folder("minift.tools")
    return recipes | {name: tools / f"{stem}.py" for name, stem in TOOL_NAMES.items()}


def _summary(script: Path) -> str:
    """The docstring's first sentence (the lines before its usage examples)."""
    doc = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8"))) or ""
    return " ".join(doc.split("\n\n")[0].split("\n"))


def usage() -> str:
    found = commands()
    width = max(map(len, found))
    lines = [f"  {name:<{width}}  {_summary(script)}" for name, script in found.items()]
    return ("usage: minift COMMAND [flags]    (minift COMMAND --help: that command's flags)\n\n"
            "commands:\n" + "\n".join(lines) + "\n\n"
            "One process runs here; for several: accelerate launch --num_processes N -m minift COMMAND [flags]")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    found = commands()
    command, flags = argv[0], argv[1:]
    if command not in found:
        close = difflib.get_close_matches(command, found, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        print(f"error: no command {command!r}; {hint}commands: {', '.join(found)}", file=sys.stderr)
        return 2
    script = found[command]
    sys.argv = [str(script), *flags]
    sys.path.insert(0, str(script.parent))  # recipes import each other by file name (``from sft import ...``)
    runpy.run_path(str(script), run_name="__main__")
    return 0
