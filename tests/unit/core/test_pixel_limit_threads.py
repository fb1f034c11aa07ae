"""Pillow's one global decompression-bomb limit (Image.MAX_IMAGE_PIXELS) under concurrent decodes with
different image.max_pixels (the local executor's threads): each decode is held to its own limit and
never to another thread's, and Pillow's limit is restored once the last decode is done."""
import io
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from patchcore_dist.core import preprocessing
from patchcore_dist.core.preprocessing import decode_sized
from patchcore_dist.errors import ImageError


def _png(w: int = 64, h: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_overlapping_decodes_keep_their_limits_and_restore_pillows(monkeypatch):
    """A enters, B enters, A leaves first, then B decodes: before, A's exit restored Pillow's 1000 under
    B (its 4096-pixel image refused as a decompression bomb) and B's exit left A's limit behind."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's own limit below both settings
    entered = {n: threading.Event() for n in "AB"}
    go = {n: threading.Event() for n in "AB"}
    opened = preprocessing._open

    def paused(data, max_pixels):
        name = threading.current_thread().name
        entered[name].set()
        assert go[name].wait(30)
        return opened(data, max_pixels)
    monkeypatch.setattr(preprocessing, "_open", paused)
    results = {}

    def decode(name, limit):
        try:
            results[name] = decode_sized(_png(), max_pixels=limit)[1]
        except ImageError as e:
            results[name] = str(e)
    a = threading.Thread(target=decode, args=("A", 10_000), name="A")
    b = threading.Thread(target=decode, args=("B", 20_000), name="B")
    try:
        a.start()
        assert entered["A"].wait(30)
        b.start()
        assert entered["B"].wait(30)
        assert Image.MAX_IMAGE_PIXELS == 20_000  # the largest limit under way
        go["A"].set()
        a.join(30)
        assert Image.MAX_IMAGE_PIXELS == 20_000  # B still decoding
        go["B"].set()
        b.join(30)
    finally:  # a failed check never leaves the threads waiting
        go["A"].set()
        go["B"].set()
    assert results == {"A": (64, 64), "B": (64, 64)}
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored after the last decode


def test_many_threads_with_different_limits():
    """Each decode held to its own limit (an image over it refused, one within accepted), however the
    threads interleave; Pillow's limit as before afterwards."""
    before = Image.MAX_IMAGE_PIXELS
    data = _png()  # 4096 pixels

    def decode(limit):
        try:
            decode_sized(data, max_pixels=limit)
            return "ok"
        except ImageError as e:
            assert "over the limit image.max_pixels" in str(e)
            return "refused"
    limits = [4096, 4095, 100_000, 2000, 10_000_000] * 40
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(decode, limits))
    assert got == ["ok" if limit >= 4096 else "refused" for limit in limits]
    assert Image.MAX_IMAGE_PIXELS == before


@pytest.mark.parametrize("limit", [1, 4095])
def test_a_single_decode_over_its_limit(limit):
    with pytest.raises(ImageError, match=f"max_pixels={limit}"):
        decode_sized(_png(), max_pixels=limit)
