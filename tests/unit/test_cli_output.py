"""What the commands print: the runs table aligned for any widths, `maintain` and `synthesize` as
sentences (never Python dicts), scores to four significant digits, and a help text for every option."""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import re

import pyarrow as pa
import pytest

from patchcore_dist.artifacts import scores
from patchcore_dist.cli import commands
from patchcore_dist.cli.commands import COMMANDS, format_runs
from patchcore_dist.cli.common import add_config_arguments
from patchcore_dist.cli.printing import g4, maintain_lines
from patchcore_dist.synthetic.categories import describe

LONG_NOTE = "3 x corrupt or truncated image; 1 x file name is not valid UTF-8; and a long tail of more words"
RECORDS = [
    {"run_id": "1", "started": "2026-12-01T08:00:00.000+00:00", "job": "fit", "model": "0123abcd0123abcd",
     "images_listed": 5, "scored": 5, "skipped": 0, "errors": 0, "images_per_s": 1.5},
    {"run_id": "2", "started": "2026-12-01T09:00:00.000+00:00", "job": "score", "model": "f" * 40,  # a long digest
     "images_listed": 123456, "scored": 120000, "skipped": 3452, "errors": 4, "anomalies": 17,
     "anomaly_rate": 17 / 120000, "score_quantiles": {"p99": 1234.5678}, "images_per_s": 250.25,
     "errors_by_reason": {"corrupt or truncated image": 3, "file name is not valid UTF-8": 1}},
    {"run_id": "3", "error": "unreadable record: Expecting value: line 1 column 2 (char 1)"},  # every field missing
    {"run_id": "4", "started": "2026-12-01T10:00:00.000+00:00", "job": "score", "model": "ab",
     "images_listed": 7, "scored": 3, "skipped": 2, "errors": 2, "errors_by_reason": {LONG_NOTE: 2}},
]
# per record: the cell each column must show ("" for a missing field)
EXPECTED = [
    ["2026-12-01T08:00:00.000+00:00", "fit", "0123abcd0123abcd", "5", "5", "0", "0", "", "", "1.5", ""],
    ["2026-12-01T09:00:00.000+00:00", "score", "f" * 40, "123456", "120000", "3452", "4", "17 (0.0%)", "1235",
     "250.25", "3 x corrupt or truncated image; 1 x file name is not valid UTF-8"],
    ["", "", "", "", "", "", "", "", "", "", "unreadable record: Expecting value: line 1 column 2 (char 1)"],
    ["2026-12-01T10:00:00.000+00:00", "score", "ab", "7", "3", "2", "2", "", "", "", f"2 x {LONG_NOTE}"],
]


def _span(header_line: str, name: str) -> tuple[int, int]:
    m = re.search(rf"(?<!\S){re.escape(name)}(?!\S)", header_line)
    assert m, name
    return m.start(), m.end()


def test_runs_table_columns_line_up_whatever_the_widths():
    lines = format_runs(RECORDS).splitlines()
    assert len(lines) == 1 + len(RECORDS) and all(line == line.rstrip() for line in lines)
    header = lines[0]
    for line, cells in zip(lines[1:], EXPECTED):
        for (name, right), cell in zip(commands.RUN_COLUMNS, cells):
            start, end = _span(header, name)
            if not cell:  # a missing field: blank under its header
                assert line[start:end].strip() == "", (name, line)
            elif right:  # numbers end where their header ends
                assert line[:end].endswith(cell) and line[end:end + 1] in ("", " "), (name, line)
                assert line[end - len(cell) - 1] == " ", (name, line)
            else:  # text starts where its header starts
                assert line[start:].startswith(cell) and (start == 0 or line[start - 1] == " "), (name, line)
    # the widest cell sets the width: the long digest does not push into the next column
    start, _ = _span(header, "listed")
    assert start > header.index("model") + 40


def test_numbers_have_four_significant_digits():
    assert g4(203.50497436523438) == "203.5" and g4(0.0123456) == "0.01235" and g4(None) == "n/a"
    assert g4(float("nan")) == "n/a" and g4(3) == "3"


def _commit(out, images, run):
    n = len(images)
    at = dt.datetime(2026, 12, 1, 8, tzinfo=dt.timezone.utc)
    rows = pa.table({"image": images, "score": pa.array([1.0] * n, pa.float64()), "model": ["m0"] * n,
                     "digest": [f"d{i}" for i in images], "size": pa.array([1] * n, pa.int64()), "mtime": [1.0] * n,
                     "ctime": pa.array([1.0] * n, pa.float64()), "etag": pa.array([None] * n, pa.string()),
                     "scored_at": pa.array([at] * n, pa.timestamp("s", tz="UTC")), "run": [run] * n,
                     "unchanged": [False] * n})
    scores.commit(out, "m0", rows, {})


def test_maintain_prints_what_it_did_in_sentences(tmp_path, capsys):
    out = str(tmp_path / "out")
    scores.open_tables(out, {})
    for k in range(3):  # three commits: three small data files in one partition
        _commit(out, [f"/img{k}"], f"r{k}")
    # (the vacuum's sentence is tested below: a retention under 1 hour is refused, so no file is old enough here)
    commands.maintain(argparse.Namespace(output=out, config=None, overrides=[], vacuum_hours=1.0, repair=False))
    printed = capsys.readouterr().out
    assert "{" not in printed and "[" not in printed, printed
    lines = printed.splitlines()
    assert lines[0] == f"maintenance of {out}:"
    assert lines[1].startswith(f"  {scores.scores_uri(out)}: table version ")
    assert ("converted 0 old Parquet parts, compacted 1 partition (3 files -> 1), checkpoint written, "
            "vacuum deleted 0 files") in lines[1]
    # nothing left to compact the second time
    commands.maintain(argparse.Namespace(output=out, config=None, overrides=[], vacuum_hours=None, repair=False))
    again = capsys.readouterr().out
    assert "nothing to compact, checkpoint written" in again and "vacuum" not in again


def test_maintain_sentences_of_every_step():
    done = {"s3://b/out/scores": {"version": 4, "converted": 1, "repaired": ["x.parquet", "y.parquet"],
                                  "compacted": None, "vacuumed": []},
            "s3://b/out/patch_scores": {"version": 2, "grids_dropped": 1,
                                        "compacted": {"numFilesRemoved": 8, "numFilesAdded": 2,
                                                      "partitionsOptimized": 2}, "vacuumed": ["a"]}}
    assert maintain_lines("s3://b/out", done) == [
        "maintenance of s3://b/out:",
        "  s3://b/out/scores: table version 4, converted 1 old Parquet part, repair dropped 2 missing data files, "
        "compaction postponed (a concurrent commit came first), checkpoint written, vacuum deleted 0 files",
        "  s3://b/out/patch_scores: table version 2, dropped 1 unused patch-score grid, compacted 2 partitions "
        "(8 files -> 2), checkpoint written, vacuum deleted 1 file"]


def test_synthesize_prints_what_it_wrote(tmp_path, capsys, caplog):
    out = str(tmp_path / "cat")
    with caplog.at_level(logging.INFO, logger="patchcore_dist"):
        commands.synthesize(argparse.Namespace(photo="brick", normal=None, output=out, images=6, image_size=96,
                                               defect_size=None, kinds="scratch,stain", test_fraction=0.3,
                                               defects_per_kind=2, config=None, overrides=[]))
    printed = capsys.readouterr().out.strip()
    assert f"synthesized category {out}: " in caplog.text and "{" not in caplog.text  # the log line in words too

    def n(*parts):
        folder = os.path.join(out, *parts)
        return len(os.listdir(folder)) if os.path.isdir(folder) else 0
    scratch, stain = n("test", "scratch"), n("test", "stain")
    assert printed == (f"wrote {out}: {n('train', 'good')} train/good, {n('test', 'good')} test/good, "
                       f"{scratch + stain} defective test images (scratch {scratch}, stain {stain}), "
                       "masks in ground_truth/")
    assert n("train", "good") == 4 and n("test", "good") == 2 and scratch + stain > 0
    assert n("ground_truth", "scratch") == scratch


def test_synthesize_line_names_skipped_images():
    line = describe({"train": 14, "test_good": 6, "scratch": 3, "stain": 3, "hole": 0, "skipped": 2})
    assert line == ("14 train/good, 6 test/good, 6 defective test images (scratch 3, stain 3, hole 0), "
                    "masks in ground_truth/; 2 unusable normal images skipped (see the warnings above)")


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_has_a_help_text(name):
    p = argparse.ArgumentParser()
    COMMANDS[name][0](p)
    add_config_arguments(p)
    missing = [a.option_strings or a.dest for a in p._actions
               if not isinstance(a, argparse._HelpAction) and not (a.help and a.help.strip())]
    assert not missing, f"patchcore {name}: options without a help text: {missing}"
