"""The faiss index of a memory bank: built (exact flat, IVF, IVF-PQ or HNSW, by index.type), serialised
for the model's files, and checked against the bank it claims to hold."""
from __future__ import annotations

import numpy as np


def faiss_module():
    import faiss
    return faiss


def faiss_gpus() -> int:
    try:
        faiss = faiss_module()
    except ImportError:
        return 0
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0



def index_type(rows: int, config) -> str:
    """The configured index type; "auto" picks flat (exact) for banks up to index.auto_flat_max rows."""
    t = config.type
    if t == "auto":
        t = "flat" if rows <= config.auto_flat_max else "hnsw"
    return t


def build_index(bank: np.ndarray, config, seed: int = 0):
    """A faiss CPU index over the bank, of the configured type (the approximate ones trained on the bank)."""
    faiss = faiss_module()
    bank = np.ascontiguousarray(bank, dtype=np.float32)
    k, d = bank.shape
    t = index_type(k, config)
    if t == "flat":
        index = faiss.IndexFlatL2(d)
    elif t in ("ivf_flat", "ivf_pq"):
        nlist = config.nlist or max(1, int(4 * np.sqrt(k)))
        nlist = min(nlist, max(1, k // 39))  # faiss wants ~39 training points per list
        quantizer = faiss.IndexFlatL2(d)
        if t == "ivf_flat":
            index = faiss.IndexIVFFlat(quantizer, d, nlist)
        else:
            if d % config.pq_m:
                raise ValueError(f"index.pq_m={config.pq_m} must divide the feature dimension {d}")
            index = faiss.IndexIVFPQ(quantizer, d, nlist, config.pq_m, config.pq_bits)
        index.cp.seed = seed
        index.train(bank)
    elif t == "hnsw":
        index = faiss.IndexHNSWFlat(d, config.hnsw_m)
        index.hnsw.efConstruction = config.ef_construction
    else:
        raise ValueError(f"unknown index type {t!r}")
    index.add(bank)
    set_search_params(index, config)
    return index


def set_search_params(index, config) -> None:
    faiss = faiss_module()
    if hasattr(index, "nprobe"):
        index.nprobe = config.nprobe
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = config.ef_search


def serialize_index(index) -> bytes:
    return faiss_module().serialize_index(index).tobytes()


def deserialize_index(data: bytes):
    return faiss_module().deserialize_index(np.frombuffer(data, dtype=np.uint8))



def index_holds(index, bank: np.ndarray, probes: int = 8) -> bool:
    """Whether ``index`` was built over ``bank``: a few rows spread over the bank are stored under their
    own ids, as the index encodes them (exactly for flat and HNSW storage; for IVF-PQ the row's own
    encoding). Catches a foreign index of the same shape, which would score against other data."""
    faiss = faiss_module()
    ids = np.unique(np.linspace(0, len(bank) - 1, min(probes, len(bank))).astype(np.int64))
    rows = np.ascontiguousarray(bank[ids], dtype=np.float32)
    ivf = isinstance(index, faiss.IndexIVF)
    if ivf:
        index.make_direct_map()
    try:
        stored = np.stack([index.reconstruct(int(i)) for i in ids])
        expected = index.sa_decode(index.sa_encode(rows)) if isinstance(index, faiss.IndexIVFPQ) else rows
    finally:
        if ivf:
            index.set_direct_map_type(faiss.DirectMap.NoMap)
    return stored.shape == expected.shape and bool(np.allclose(stored, expected, rtol=1e-5, atol=1e-6))

