"""A data file of the table that cannot be read: the 'delete it and --repair' recovery is given
only for a file that is missing or corrupt, never for a read that failed for another reason
(permission, network), where deleting the file would lose its rows for nothing."""
import glob
import os

import pytest

from patchcore_dist.artifacts import delta, scores
from patchcore_dist.errors import StorageError

from test_scores import MODEL, _rows


def test_a_missing_data_file_gets_the_repair_advice(tmp_path):
    out = str(tmp_path / "out")
    scores.open_tables(out, {})
    scores.commit(out, MODEL, _rows(["/a"]), {})
    [part] = glob.glob(os.path.join(out, "scores", f"model={MODEL}", "*.parquet"))
    os.remove(part)
    with pytest.raises(StorageError, match=rf"{os.path.basename(part)}.*--repair"):
        scores.read_scores(out)


def test_a_network_failure_reading_a_data_file_gets_no_repair_advice():
    import boto3
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    opts = {"endpoint_url": f"http://{host}:{port}"}
    boto3.client("s3", endpoint_url=opts["endpoint_url"], region_name="us-east-1").create_bucket(Bucket="unreachable")
    out = "s3://unreachable/out"
    scores.open_tables(out, opts)
    scores.commit(out, MODEL, _rows(["/a"]), opts)
    uri = scores.scores_uri(out)
    ds = delta.dataset(delta.load(uri, opts), uri, opts, scores._stored(scores.SCORE_SCHEMA))
    server.stop()  # the store goes away between reading the log and reading the data files
    with pytest.raises(StorageError) as e:
        delta.read(ds, uri)
    msg = str(e.value)
    assert "part-00000-" in msg and "--repair" not in msg and "cannot be read" not in msg
    assert "not missing nor corrupt" in msg and "run again; do not delete them" in msg
