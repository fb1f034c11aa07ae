"""Console entry points (patchcore-fit, patchcore-score, ...): the same as python jobs/<job>.py."""
import runpy
import sys
from pathlib import Path

_JOBS = Path(__file__).resolve().parent.parent / "jobs"


def _run(name: str) -> None:
    sys.argv[0] = str(_JOBS / f"{name}.py")
    runpy.run_path(str(_JOBS / f"{name}.py"), run_name="__main__")


def fit():
    _run("fit")


def score():
    _run("score")


def evaluate():
    _run("evaluate")


def synthesize():
    _run("synthesize")
