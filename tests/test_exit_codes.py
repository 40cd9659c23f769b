"""Exit codes: defined once (introvae_dist/exit_codes.py), and the copies bash must keep
(launchers/slurm.sh cannot import Python) hold the same values."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from introvae_dist import exit_codes

REPO = Path(__file__).resolve().parents[1]


def test_slurm_script_uses_the_modules_values() -> None:
    text = (REPO / "launchers" / "slurm.sh").read_text()
    copies = dict(re.findall(r"^(EXIT_\w+)=(\d+)", text, flags=re.MULTILINE))
    assert copies == {"EXIT_BAD_INPUT": str(exit_codes.EXIT_BAD_INPUT),
                      "EXIT_SAVED": str(exit_codes.EXIT_SAVED_ON_SIGNAL)}


def test_no_python_module_defines_an_exit_code_of_its_own() -> None:
    """An `EXIT_* = <int>` assignment anywhere but exit_codes.py would be a second definition
    (bench/ keeps its own usage status for the benchmark scripts, which are not the product)."""
    others = []
    for path in [*(REPO / "introvae_dist").rglob("*.py"), *(REPO / "launchers").rglob("*.py")]:
        if path.name == "exit_codes.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id.startswith("EXIT_") for t in node.targets):
                others.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert others == [], others
