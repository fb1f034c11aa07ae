"""Run records: one JSON object per run, read back oldest first, a bad record never hides the others."""
from patchcore_dist.artifacts.runs import error_reasons, new_run_id, read_runs, write_run
from patchcore_dist.cli.commands import format_runs


def test_write_and_read_back(tmp_path):
    out = str(tmp_path)
    ids = []
    for n in (3, 5):
        run_id, started = new_run_id()
        ids.append(run_id)
        write_run(out, {"run_id": run_id, "job": "score", "started": started, "images_listed": n, "scored": n,
                        "skipped": 0, "errors": 0}, {})
    (tmp_path / "runs" / "zzz.json").write_text("{not json")
    runs = read_runs(out, {})
    assert [r["run_id"] for r in runs[:2]] == sorted(ids) and [r["images_listed"] for r in runs[:2]] == [3, 5]
    assert runs[2]["run_id"] == "zzz" and "unreadable" in runs[2]["error"]
    table = format_runs(runs)
    assert len(table.splitlines()) == 4 and "unreadable" in table


def test_error_reasons_group_messages():
    reasons = error_reasons(["image is 8x8, smaller than image.min_side=16", "image is 9x9, smaller than image.min_side=16",
                             "not a recognised image format", "corrupt or truncated image: broken data stream"])
    assert reasons == {"image is NxN, smaller than image.min_side=N": 2, "not a recognised image format": 1,
                       "corrupt or truncated image": 1}


def test_no_runs(tmp_path):
    assert read_runs(str(tmp_path), {}) == []
