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


def test_malformed_records_are_skipped_with_a_warning_naming_the_file(tmp_path, caplog):
    out = str(tmp_path)
    run_id, started = new_run_id()
    write_run(out, {"run_id": run_id, "job": "score", "started": started, "images_listed": 2}, {})
    bad = {"list.json": "[1, 2]", "int-id.json": '{"run_id": 1, "job": "score", "started": "x"}',
           "no-keys.json": '{"scored": 3}', "quantiles.json": '{"run_id": "q", "job": "score", "started": "x", '
                                                               '"score_quantiles": {"p50": 1}}',
           "rate.json": '{"run_id": "r", "job": "score", "started": "x", "anomaly_rate": "high"}',
           "drift.json": '{"run_id": "d", "job": "score", "started": "x", "drift": {"warning": true}}',
           "reasons.json": '{"run_id": "e", "job": "score", "started": "x", "errors_by_reason": ["a"]}'}
    for name, text in bad.items():
        (tmp_path / "runs" / name).write_text(text)
    with caplog.at_level("WARNING"):
        runs = read_runs(out, {})
    assert [r["run_id"] for r in runs] == [run_id]
    for name in bad:
        assert f"{tmp_path / 'runs' / name}" in caplog.text
    assert "skipped the malformed run record" in caplog.text
    format_runs(runs)


def test_the_runs_command_escapes_control_characters(tmp_path, capsys):
    from patchcore_dist import cli
    out = str(tmp_path)
    write_run(out, {"run_id": "20260101T000000000000Z-aaaaaaaa", "job": "score\x1b[2J", "started": "2026-01-01",
                    "model": "m\r12:00 forged", "errors_by_reason": {"bad\x07 bell\nnext": 1}}, {})
    assert cli.main(["runs", "--output", out]) == 0
    printed = capsys.readouterr().out
    assert "\x1b" not in printed and "\r" not in printed and "\x07" not in printed
    assert len(printed.strip().splitlines()) == 2  # the header and one row: no forged line
    assert "score\\x1b[2J" in printed and "m\\r12:00 forged" in printed and "bad\\x07 bell\\nnext" in printed
    # what read_runs returns is the record as written
    assert read_runs(out, {})[0]["job"] == "score\x1b[2J"
