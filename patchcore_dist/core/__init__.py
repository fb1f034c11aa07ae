"""The algorithm: PatchCore in torch / numpy / scipy / faiss / PIL.

Knows nothing of Ray or storage: it takes arrays and returns arrays. ``artifacts`` puts its results
on storage and ``pipeline`` runs it on Ray.
"""
