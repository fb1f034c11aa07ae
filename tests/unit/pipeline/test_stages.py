"""The decode stage's hand-over to a renderer in the same process: decoded pixels instead of a second
decode, within a budget of pixels and bytes per batch (a CPU actor's memory)."""
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
    assert len(out["data"][list(files).index("large.jpg")])  # from the bytes the decode read
    for i, name in enumerate(files):
        if kept[name] is None:
            continue
        assert out["data"][i] == b""  # the pixels kept, the file's bytes are not
        again, _ = decode_sized((tmp_path / name).read_bytes(), cfg.image.max_pixels, cfg.image.min_side,
                                shorter_side=int(min(out["height"][i], out["width"][i])))
        assert np.array_equal(kept[name], again), name
    assert "pixels" not in decode_batch({"uri": uris, "rel": uris}, cfg.to_dict(), keep_bytes=True)
    # the renderer drops the pixels with the bytes
    scored = dict(out, score=np.zeros(3), patch_scores=np.zeros((3, 4), np.float32), grid_h=np.full(3, 2),
                  grid_w=np.full(3, 2))
    rendered = render_batch(scored, cfg.to_dict(), str(tmp_path / "heat"), (0.0, 1.0))
    assert "pixels" not in rendered and "data" not in rendered
    assert all(os.path.exists(h) for h in rendered["heatmap"])


def _large_pngs(tmp_path, n=4, size=(1200, 900)):
    """``n`` PNGs of 1200 x 900 (3.24 MB of pixels each), scikit-image photographs enlarged."""
    names = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina")
    for i in range(n):
        a = np.asarray(getattr(skimage.data, names[i % len(names)])())[..., :3]
        Image.fromarray(a).resize(size, Image.BICUBIC).save(tmp_path / f"{i}.png")
    uris = np.array([str(tmp_path / f"{i}.png") for i in range(n)], object)
    return {"uri": uris, "rel": np.array([f"{i}.png" for i in range(n)], object)}


def _held(batch) -> list[tuple[int, int]]:
    """Per row: (bytes of kept pixels, bytes of the kept file)."""
    return [(0 if p is None else p.nbytes, len(d)) for p, d in zip(batch["pixels"], batch["data"])]


def test_a_batch_keeps_its_originals_for_the_overlays_within_a_budget(tmp_path):
    """Pixels while they fit, else the file's bytes while they fit, else nothing (the overlay reads the file
    again): the batch never holds more than keep_budget, and the overlays are the same whatever is kept."""
    cfg = load_config().to_dict()
    batch = _large_pngs(tmp_path)
    sizes = [os.path.getsize(u) for u in batch["uri"]]
    px = 1200 * 900 * 3
    budget = 2 * px + min(sizes[2:]) + 1000
    out = {b: decode_batch(batch, cfg, keep_bytes=True, keep_pixels=True, keep_budget=b) for b in (None, budget, 0)}
    assert _held(out[None]) == [(px, 0)] * 4  # no budget: every image's pixels, never its bytes as well
    held, left, files = _held(out[budget]), budget - 2 * px, []
    for size in sizes[2:]:  # the third image's pixels are over: the files' bytes, in order, while they fit
        files.append(size if size <= left else 0)
        left -= files[-1]
    assert held == [(px, 0)] * 2 + [(0, d) for d in files] and sum(map(sum, held)) <= budget
    assert sum(files) > 0
    assert _held(out[0]) == [(0, 0)] * 4
    assert "pixels" not in decode_batch(batch, cfg, keep_bytes=True, keep_budget=0)  # the Ray decode tasks
    overlays = {}
    grids = dict(score=np.ones(4), patch_scores=np.random.default_rng(0).random((4, 16)).astype(np.float32),
                 grid_h=np.full(4, 4), grid_w=np.full(4, 4))
    for b, dec in out.items():
        rendered = render_batch(dict(dec, **grids), cfg, str(tmp_path / f"heat-{b}"), (0.0, 1.0))
        assert not any(rendered["warning"]), rendered["warning"]
        overlays[b] = [open(str(tmp_path / f"heat-{b}" / f"{i}.png_overlay.jpg"), "rb").read() for i in range(4)]
    assert overlays[None] == overlays[budget] == overlays[0]  # the same pixels, kept, from bytes or read again


def test_an_overlay_read_again_is_of_the_file_that_was_scored(tmp_path):
    """An image whose bytes were not kept is read again for its overlay; if the file changed in between,
    the overlay is not drawn over another image: a warning, the score and heatmap stay."""
    cfg = load_config().to_dict()
    batch = _large_pngs(tmp_path, n=2)
    dec = decode_batch(batch, cfg, keep_bytes=True, keep_pixels=True, keep_budget=0)
    Image.fromarray(skimage.data.camera()).save(batch["uri"][1])
    rendered = render_batch(dict(dec, score=np.ones(2), patch_scores=np.zeros((2, 4), np.float32),
                                 grid_h=np.full(2, 2), grid_w=np.full(2, 2)), cfg, str(tmp_path / "heat"), (0.0, 1.0))
    assert rendered["warning"].tolist() == ["", "overlay not written: the file changed since it was scored"]
    assert all(os.path.exists(h) for h in rendered["heatmap"])


def test_the_cpu_actor_renders_from_a_batch_within_its_budget(tmp_path, monkeypatch):
    """DecodeScoreRender (CPU actors, the in-process executor) hands render_batch a batch that keeps at
    most keep_budget (default KEEP_BUDGET: 64 MP of pixels) of the originals; every image is scored and
    gets its heatmap and overlay."""
    from helpers import SMALL

    from patchcore_dist.pipeline import stages
    from patchcore_dist.pipeline.fit import run_fit
    train = tmp_path / "train"
    train.mkdir()
    brick = skimage.data.brick()
    for i in range(4):
        Image.fromarray(brick[40 * i:40 * i + 256, 40 * i:40 * i + 256]).save(train / f"{i}.png")
    over = SMALL + ["runtime.executor=local"]
    run_fit(str(train), str(tmp_path / "model"), load_config(None, over))
    cfg = load_config(None, over).to_dict()
    seen = []
    real = stages.render_batch
    monkeypatch.setattr(stages, "render_batch", lambda batch, **kw: seen.append(_held(batch)) or real(batch, **kw))
    batch = _large_pngs(tmp_path, n=4)
    render = {"config": cfg, "heatmaps_uri": str(tmp_path / "heat"), "vrange": (0.0, 1.0)}
    assert stages.DecodeScoreRender(str(tmp_path / "model"), cfg, keep_bytes=True, render=render).keep_budget \
        == stages.KEEP_BUDGET == 192_000_000
    actor = stages.DecodeScoreRender(str(tmp_path / "model"), cfg, keep_bytes=True, render=render,
                                     keep_budget=5_000_000)
    out = actor(batch)
    assert not any(out["error"]) and np.isfinite(out["score"]).all() and not any(out["warning"])
    assert seen[0][0] == (1200 * 900 * 3, 0) and all(p == 0 for p, _ in seen[0][1:])  # one image's pixels fit
    assert sum(map(sum, seen[0])) <= 5_000_000
    assert all(os.path.exists(str(tmp_path / "heat" / f"{i}.png_overlay.jpg")) for i in range(4))


def test_a_folder_replaced_by_a_link_after_the_listing_is_not_followed(tmp_path):
    """The listing never follows a folder link out of the input root; a folder swapped for such a link
    between the listing and the decode gets an error row naming the file outside, nothing read from
    there; the same folder back in place is read again."""
    from patchcore_dist.artifacts import storage
    root, outside = tmp_path / "images", tmp_path / "outside"
    (root / "line").mkdir(parents=True)
    outside.mkdir()
    Image.fromarray(skimage.data.astronaut()).save(root / "line" / "a.png")
    Image.fromarray(skimage.data.coffee()).save(outside / "a.png")  # what must not be read
    listed = storage.list_table(str(root), (".png",))
    batch = {k: np.array(listed.column(k).to_pylist(), object) for k in ("uri", "rel")}
    assert list(batch["rel"]) == ["line/a.png"]
    cfg = load_config().to_dict()
    assert list(decode_batch(batch, cfg)["error"]) == [""]
    os.rename(root / "line", tmp_path / "moved")
    os.symlink(outside, root / "line")  # the swap, after the listing
    err = decode_batch(batch, cfg)["error"][0]
    assert "now lies outside" in err and str(outside / "a.png") in err
    os.remove(root / "line")
    os.symlink(tmp_path / "moved", root / "line")  # a link, but to a folder outside the root as well
    assert "now lies outside" in decode_batch(batch, cfg)["error"][0]
    os.remove(root / "line")
    os.rename(tmp_path / "moved", root / "line")
    assert list(decode_batch(batch, cfg)["error"]) == [""]
