"""The progress line of slow stages: a rate that reads well above and below one image a second, and the
time left once the rate is known."""
import logging

from patchcore_dist.pipeline.cluster import iterate_with_progress, progress_line


def test_fast_stage_in_images_per_second_with_eta():
    assert progress_line("scoring", 500, 2000, 3, 20.0) == \
        "scoring: 500 / 2000 images (3 errors), 25.0 images/s, ETA 1 min 00 s"


def test_slow_stage_in_seconds_per_image_with_eta():
    # 4 images in 50 s: 0.08 images/s would print as 0.1 (or 0.0) images/s
    assert progress_line("extracting", 4, 100, 0, 50.0) == \
        "extracting: 4 / 100 images (0 errors), 12.5 s/image, ETA 20 min 00 s"
    assert progress_line("scoring", 3, 10_000, 0, 3600.0).endswith("1200.0 s/image, ETA 3332 h 20 min")


def test_before_the_first_image_and_at_the_end():
    assert progress_line("scoring", 0, 10, 0, 7.0) == "scoring: 0 / 10 images (0 errors), rate not known yet"
    assert progress_line("scoring", 10, 10, 1, 5.0).endswith("2.0 images/s, ETA 0 s")
    assert progress_line("scoring", 10, 10, 0, 0.0).endswith("rate not known yet")


def test_the_stage_logs_the_line(caplog):
    batches = [{"uri": ["a", "b"], "error": ["", "broken"]}, {"uri": ["c"], "error": [""]}]
    with caplog.at_level(logging.INFO, logger="patchcore_dist.pipeline.cluster"):
        out = list(iterate_with_progress(iter(batches), 3, "scoring", every=-1.0))
    assert out == batches
    lines = [r.getMessage() for r in caplog.records]
    assert lines and lines[-1].startswith("scoring: 3 / 3 images (1 errors), ") and "ETA 0 s" in lines[-1]
