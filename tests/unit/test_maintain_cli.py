"""`patchcore maintain` arguments: every retention that is not a positive number of hours, and an
output that holds no score table, end in one `error:` line and exit code 2, with nothing created."""
from __future__ import annotations

import os

import pytest

from patchcore_dist import cli
from patchcore_dist.artifacts import scores


def _refused(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0]
    return errors[0]


@pytest.mark.parametrize("hours", ["0", "-1", "-0.5", "nan", "inf", "-inf", "soon", ""])
def test_a_bad_vacuum_retention_is_one_error_line_and_exit_code_2(tmp_path, capsys, hours):
    out = str(tmp_path / "out")
    scores.open_tables(out, {})
    error = _refused(capsys, ["maintain", "--output", out, f"--vacuum-hours={hours}"])
    assert "--vacuum-hours" in error and "positive number of hours" in error
    # as a separate word, a negative number is taken for an option by argparse: still one error line
    assert "--vacuum-hours" in _refused(capsys, ["maintain", "--output", out, "--vacuum-hours", hours or "-1"])


def test_a_fractional_retention_is_accepted_and_rounds_up(tmp_path, capsys):
    out = str(tmp_path / "out")
    scores.open_tables(out, {})
    assert cli.main(["maintain", "--output", out, "--vacuum-hours", "0.5"]) == 0
    assert "vacuum deleted 0 files" in capsys.readouterr().out


def test_maintain_of_an_output_without_a_score_table_is_refused(tmp_path, capsys):
    typo = str(tmp_path / "outt")
    assert cli.main(["maintain", "--output", typo]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no score table under {typo}") and len(err.strip().splitlines()) == 1
    assert not os.path.exists(typo)
