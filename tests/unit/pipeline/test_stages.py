"""The decode stage's hand-over to a renderer in the same process: decoded pixels instead of a second decode."""
import os

import numpy as np
import skimage.data
from PIL import Image

from patchcore_dist.config import load_config
from patchcore_dist.core.preprocessing import decode_sized
from patchcore_dist.pipeline.stages import decode_batch, render_batch


def test_pixels_are_kept_only_at_the_original_size_and_equal_a_second_decode(tmp_path):
    cfg = load_config()
    files = {"photo.png": (skimage.data.astronaut(), "PNG"), "small.jpg": (skimage.data.coffee(), "JPEG"),
             "large.jpg": (np.tile(skimage.data.coffee(), (3, 3, 1)), "JPEG")}  # 1200 x 1800: drafted
    for name, (img, fmt) in files.items():
        Image.fromarray(img).save(tmp_path / name, fmt)
    uris = np.array([str(tmp_path / n) for n in files], object)
    out = decode_batch({"uri": uris, "rel": uris}, cfg.to_dict(), keep_bytes=True, keep_pixels=True)
    kept = {os.path.basename(u): p for u, p in zip(uris, out["pixels"])}
    assert kept["large.jpg"] is None  # decoded at a reduced scale: the overlay decodes it again
    for i, name in enumerate(files):
        if kept[name] is None:
            continue
        again, _ = decode_sized(bytes(out["data"][i]), cfg.image.max_pixels, cfg.image.min_side,
                                shorter_side=int(min(out["height"][i], out["width"][i])))
        assert np.array_equal(kept[name], again), name
    assert "pixels" not in decode_batch({"uri": uris, "rel": uris}, cfg.to_dict(), keep_bytes=True)
    # the renderer drops the pixels with the bytes
    scored = dict(out, score=np.zeros(3), patch_scores=np.zeros((3, 4), np.float32), grid_h=np.full(3, 2),
                  grid_w=np.full(3, 2))
    rendered = render_batch(scored, cfg.to_dict(), str(tmp_path / "heat"), (0.0, 1.0))
    assert "pixels" not in rendered and "data" not in rendered
    assert all(os.path.exists(h) for h in rendered["heatmap"])
