"""The README's commands, verbatim: every fenced block marked ``<!-- readme-test -->`` runs in order in an
empty folder (relative paths and all), ``bash`` blocks command by command, ``python`` blocks as scripts,
with the installed ``patchcore`` of this environment on PATH. A failing command fails the test with
the command and its output."""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

from helpers import ROOT

README = pathlib.Path(ROOT) / "README.md"
MARK = "<!-- readme-test -->"
BIN = os.path.dirname(sys.executable)

def marked_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block right after the marker, in README order."""
    pattern = re.compile(re.escape(MARK) + r"\s*\n```(\w+)\n(.*?)\n```", re.S)
    return [(m.group(1), m.group(2)) for m in pattern.finditer(text)]


def shell_commands(body: str) -> list[str]:
    """A bash block's commands: continuation lines joined, comments and blank lines dropped."""
    out, current = [], ""
    for line in body.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.strip() if current else line.rstrip()
        if current.endswith("\\"):
            current = current[:-1].rstrip() + " "
        else:
            out.append(current.strip())
            current = ""
    return out


def _env() -> dict:
    """This environment's scripts first on PATH; this checkout's package before any installed copy."""
    path = os.pathsep.join([BIN, os.environ.get("PATH", "")])
    pythonpath = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PATH": path, "PYTHONPATH": pythonpath}


def _run(lang: str, code: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    argv = ["bash", "-eo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    return subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)


def test_the_marked_blocks_are_found():
    blocks = marked_blocks(README.read_text())
    commands = [c for lang, body in blocks if lang == "bash" for c in shell_commands(body)]
    assert len(blocks) >= 5 and any(c.startswith("patchcore fit ") for c in commands), blocks
    assert shell_commands("a \\\n  b\n# note\n\nc") == ["a b", "c"]


def test_the_readme_journey_runs_verbatim(tmp_path):
    if not os.path.exists(os.path.join(BIN, "patchcore")):
        pytest.skip(f"the patchcore script is not installed in {BIN} (pip install -e .)")
    done = set()
    for lang, body in marked_blocks(README.read_text()):
        for code in shell_commands(body) if lang == "bash" else [body]:
            r = _run(lang, code, tmp_path)
            output = r.stdout + r.stderr
            assert r.returncode == 0, f"README command failed (exit {r.returncode}):\n  {code}\n{output[-6000:]}"
            if code.startswith("patchcore score"):
                _check_score(code, output, tmp_path, again=code in done)
            done.add(code)
    assert done, "no README command ran"


def _check_score(code: str, output: str, cwd: pathlib.Path, again: bool) -> None:
    """What the README promises of score: the review page, the table's columns; a re-run does nothing."""
    if again:
        assert "nothing to do" in output, f"the re-run\n  {code}\ndid not say 'nothing to do':\n{output[-3000:]}"
        return
    out = cwd / code.split("--output ", 1)[1].split()[0]
    assert (out / "review.html").is_file() and f"{out.resolve()}/review.html" in output, output[-3000:]
    _columns(out / "scores")


def _columns(table: pathlib.Path) -> None:
    """The README's score-table columns are the table's columns."""
    from deltalake import DeltaTable
    section = README.read_text().split("## The score table", 1)[1].split("\n## ", 1)[0]
    documented = {c for row in re.findall(r"^\| (`.*?) \|", section, re.M) for c in re.findall(r"`(\w+)`", row)}
    actual = {f.name for f in DeltaTable(str(table)).schema().fields}
    assert documented == actual, f"README columns {sorted(documented ^ actual)} differ from the table's"
