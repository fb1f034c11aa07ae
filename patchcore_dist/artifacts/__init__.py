"""Bytes on storage: URIs, the model directory and its manifest, feature shards, score tables, inputs.

May use the algorithm (:mod:`patchcore_dist.core`), never Ray.
"""
