"""What a vacuum may delete: only the table's own data files (named as the table names them, in its
partition folders), never a file a link leads to, never a user's file; and a folder that is not a
Delta table is never adopted as the score table."""
import os
import time
import uuid

import pytest

from patchcore_dist.artifacts import scores
from patchcore_dist.errors import JobError, StorageError

from test_scores import MODEL, _rows


def _data_name():
    return f"part-00000-{uuid.uuid4()}-c000.snappy.parquet"


def _old(*paths, hours=3):
    t = time.time() - hours * 3600
    for p in paths:
        os.utime(p, (t, t), follow_symlinks=False)


def _write(path, data=b"x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_a_directory_link_inside_the_table_is_refused_and_nothing_it_leads_to_is_deleted(tmp_path):
    out = str(tmp_path / "out")
    scores.open_tables(out, {})
    scores.commit(out, MODEL, _rows(["/a"]), {})
    outside = tmp_path / "elsewhere"
    precious = [_write(str(outside / "precious.txt")), _write(str(outside / _data_name())),
                _write(str(outside / f"model={MODEL}" / _data_name()))]
    leftover = _write(os.path.join(out, "scores", f"model={MODEL}", _data_name()))
    _old(*precious, leftover)
    link = os.path.join(out, "scores", "shared")
    os.symlink(outside, link)
    with pytest.raises(StorageError, match=rf"{link} is a symbolic link inside the Delta table .*remove the link"):
        scores.maintain(out, {}, vacuum_hours=1)
    assert all(os.path.exists(p) for p in precious) and os.path.exists(leftover)  # nothing deleted at all
    os.remove(link)
    os.symlink(outside / "precious.txt", os.path.join(out, "scores", f"model={MODEL}", _data_name()))  # a file link
    with pytest.raises(StorageError, match="is a symbolic link inside the Delta table"):
        scores.maintain(out, {}, vacuum_hours=1)
    assert all(os.path.exists(p) for p in precious)


def test_the_vacuum_deletes_only_the_tables_own_data_files(tmp_path):
    out = str(tmp_path / "out")
    scores.open_tables(out, {})
    scores.commit(out, MODEL, _rows(["/a", "/b"], 1.0), {})
    before = scores.read_scores(out)
    folder = os.path.join(out, "scores")
    leftover = _write(os.path.join(folder, f"model={MODEL}", _data_name()))   # a crashed run's data file
    fresh = _write(os.path.join(folder, f"model={MODEL}", _data_name()))      # a running job's, not committed yet
    foreign = [_write(os.path.join(folder, f"model={MODEL}", "notes.parquet")), _write(os.path.join(folder, "README.txt")),
               _write(os.path.join(folder, _data_name())),                     # not in a partition folder
               _write(os.path.join(folder, "mine", _data_name())),             # nor in one of the table's
               _write(os.path.join(folder, f"model={MODEL}", "keep", _data_name()))]
    _old(leftover, *foreign)
    done = scores.maintain(out, {}, vacuum_hours=1)
    assert done[scores.scores_uri(out)]["vacuumed"] == [f"model={MODEL}/{os.path.basename(leftover)}"]
    assert not os.path.exists(leftover) and os.path.exists(fresh) and all(os.path.exists(f) for f in foreign)
    assert scores.read_scores(out).equals(before)


@pytest.mark.parametrize("folder", ["scores", "patch_scores"])
def test_a_folder_that_is_not_a_delta_table_is_never_adopted(tmp_path, folder):
    out = str(tmp_path / "out")
    mine = _write(os.path.join(out, folder, "2025", "report.csv"), b"mine")
    _old(mine)
    with pytest.raises(StorageError, match=rf"{os.path.join(out, folder)} holds files but is not a Delta table"):
        scores.open_tables(out, {})
    with pytest.raises(StorageError, match="is not a Delta table"):
        scores.maintain(out, {}, vacuum_hours=1)
    assert open(mine, "rb").read() == b"mine" and not os.path.exists(os.path.join(out, folder, "_delta_log"))
    # an empty folder is fine: it becomes the table
    os.remove(mine)
    os.rmdir(os.path.dirname(mine))
    scores.open_tables(out, {})
    scores.commit(out, MODEL, _rows(["/a"]), {})
    assert scores.read_scores(out).num_rows == 1


def test_maintain_refuses_an_output_without_a_score_table(tmp_path):
    typo = str(tmp_path / "outt")
    with pytest.raises(StorageError, match=rf"no score table under {typo}.*--output"):
        scores.maintain(typo, {})
    assert not os.path.exists(typo)


@pytest.mark.parametrize("hours", [0, -1, float("nan"), float("inf")])
def test_maintain_refuses_a_retention_that_is_not_a_positive_number_of_hours(tmp_path, hours):
    out = str(tmp_path / "out")
    scores.open_tables(out, {})
    with pytest.raises(JobError, match="vacuum retention must be a positive"):
        scores.maintain(out, {}, vacuum_hours=hours)


def test_a_fractional_retention_rounds_up(tmp_path):
    """--vacuum-hours 0.5 once truncated to 0 and deleted a running job's data file."""
    out = str(tmp_path / "out")
    scores.open_tables(out, {})
    scores.commit(out, MODEL, _rows(["/a"]), {})
    running = _write(os.path.join(out, "scores", f"model={MODEL}", _data_name()))
    _old(running, hours=0.75)  # older than half an hour, younger than the one hour 0.5 rounds up to
    done = scores.maintain(out, {}, vacuum_hours=0.5)
    assert done[scores.scores_uri(out)]["vacuumed"] == [] and os.path.exists(running)
