"""The Ray jobs: fit, score, evaluate, and the stages and cluster helpers they share.

The only package that imports Ray.
"""
