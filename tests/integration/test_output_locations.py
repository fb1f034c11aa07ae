"""The score job (in process) into outputs whose path needs escaping in a URL, run twice: the second
run finds the first one's rows. An output with a percent-escape ends in one clear error before any
image is read (delta-rs would read its table from another path than it writes it to)."""
import os

import pytest

from patchcore_dist.artifacts import scores
from patchcore_dist.errors import StorageError
from patchcore_dist.pipeline.score import run_score

from helpers import SMALL

ARGS = SMALL + ["runtime.executor=local", "output.overlay=false"]


def test_a_score_job_twice_into_an_output_with_a_space_a_hash_and_a_non_ascii_letter(small_model, category,
                                                                                      tmp_path):
    out = str(tmp_path / "out dir #1 ä")
    first = run_score(small_model, f"{category}/test/hole", out, None, ARGS)
    assert first["rows"] > 0 and first["errors"] == 0
    second = run_score(small_model, f"{category}/test/hole", out, None, ARGS)
    assert second["rows"] == 0 and second["skipped"] == first["rows"]
    table = scores.read_scores(out)
    assert table.num_rows == first["rows"] and all(os.path.exists(h) for h in table.column("heatmap").to_pylist())


def test_a_score_job_into_an_output_with_a_percent_escape_is_refused(small_model, category, tmp_path):
    out = str(tmp_path / "run%41")
    for _ in range(2):
        with pytest.raises(StorageError, match="'%41'"):
            run_score(small_model, f"{category}/test/hole", out, None, ARGS)
    assert not os.path.exists(os.path.join(out, "scores")) and not (tmp_path / "runA").exists()
