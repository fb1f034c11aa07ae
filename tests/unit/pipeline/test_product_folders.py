"""fit --products / score --models: which folders are products (local and S3), and --only."""
import pytest

from patchcore_dist.artifacts import storage
from patchcore_dist.errors import JobError
from patchcore_dist.pipeline.products import product_folders, selected


@pytest.mark.parametrize("where", ["local", "s3"])
def test_products_are_the_sub_folders_but_hidden_and_underscored_ones(where, tmp_path, request):
    if where == "local":
        root, opts = str(tmp_path / "root"), {}
    else:
        s3, bucket = request.getfixturevalue("s3"), request.getfixturevalue("bucket")
        root, opts = f"s3://{bucket}/products/{tmp_path.name}", {"endpoint_url": s3}
    for rel in ("brick/a.png", "gravel/train/good/b.png", ".hidden/c.png", "_validation/d.png", "loose.png"):
        storage.write_bytes(storage.join(root, rel), b"x", **opts)
    assert product_folders(root, opts) == ["brick", "gravel"]


def test_only_names_existing_products():
    assert selected(["a", "b", "c"], "c, a") == ["c", "a"]
    assert selected(["a", "b"], None) == ["a", "b"]
    with pytest.raises(JobError, match="--only names products with no folder under --products: z"):
        selected(["a", "b"], "a,z")
