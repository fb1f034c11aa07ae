"""patchcore-dist: PatchCore industrial anomaly detection as a distributed batch job on Ray."""
__version__ = "0.1.0"
