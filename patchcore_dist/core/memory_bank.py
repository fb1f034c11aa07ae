"""Memory bank and nearest-neighbour search.

The memory bank is a float32 matrix [K, D]; search is exact L2 (faiss ``IndexFlatL2``), on the GPU
when the installed faiss supports it, else faiss on the CPU. Without faiss GPU support but with a
CUDA device, a chunked torch matmul search with a fused top-k gives the same distances on the GPU.
On the CPU, exact search of a large enough bank is pruned (:class:`PrunedFlatSearch`): a cheap lower
bound picks candidates, the candidates are measured exactly, and a query whose answer the bound
cannot prove is searched in full, so the neighbours are those of the brute-force search.
Distances returned are Euclidean (faiss returns squared L2; we take the square root).
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from .devices import fp32_arithmetic

log = logging.getLogger(__name__)


def _faiss():
    import faiss
    return faiss


def faiss_gpus() -> int:
    try:
        faiss = _faiss()
    except ImportError:
        return 0
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


# exact_search=auto prunes banks from this many rows (below, brute force is already fast)
PRUNE_MIN_ROWS = 2048
# Adaptive pruned search (exact_search=auto), decided per block of a call's queries: one query in
# PROBE_EVERY goes through the bound's first pass (a probe costs about half a brute-force query, so
# probing adds ~1.5 % on a batch that ends up brute-forced); a block of BLOCK_ROWS queries (about one
# image's patches) is pruned when at most MAX_FIRST_UNPROVEN of its probes are left unproven, else
# brute-forced. Pruning costs ~0.55 + 1.35 u of brute force at a first-pass unproven share u (worst
# case), so it pays up to u ~ 0.33; in-distribution patches leave ~1 %, far ones ~97 %
# (benchmarks/search.py).
PROBE_EVERY = 32
BLOCK_ROWS = 1024
MAX_FIRST_UNPROVEN = 0.25
# tf32 search: candidates per query beyond k whose distances are re-measured in float32
TF32_EXTRA_CANDIDATES = 7


def index_type(rows: int, config) -> str:
    """The configured index type; "auto" picks flat (exact) for banks up to index.auto_flat_max rows."""
    t = config.type
    if t == "auto":
        t = "flat" if rows <= config.auto_flat_max else "hnsw"
    return t


def build_index(bank: np.ndarray, config, seed: int = 0):
    """A faiss CPU index over the bank, of the configured type (the approximate ones trained on the bank)."""
    faiss = _faiss()
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
    faiss = _faiss()
    if hasattr(index, "nprobe"):
        index.nprobe = config.nprobe
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = config.ef_search


def serialize_index(index) -> bytes:
    return _faiss().serialize_index(index).tobytes()


def deserialize_index(data: bytes):
    return _faiss().deserialize_index(np.frombuffer(data, dtype=np.uint8))


def search_excluding(bank: np.ndarray, queries: np.ndarray, exclude: np.ndarray, k: int = 1,
                     chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distances [N, k] and indices [N, k] of the k nearest rows of ``bank`` other than the
    rows ``exclude`` (e.g. a training image's own patches, to score it as if it were unseen). Excluding
    every row would leave nothing to search: then none is excluded.

    Written with torch rather than a faiss ID selector: faiss's flat search with a selector leaves
    BLAS (measured 1.7 s for 784 queries against 3,136 rows, against a few ms here). Exact: the
    squared distances of one GEMM, the excluded columns set to infinity, the k smallest kept.
    """
    b = torch.from_numpy(np.ascontiguousarray(bank, dtype=np.float32))
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    exclude = np.asarray(exclude, np.int64)
    if len(exclude) >= len(b):
        exclude = exclude[:0]
    k = min(k, len(b) - len(exclude))
    b_sq = (b * b).sum(1)
    out_d, out_i = [], []
    for s in range(0, len(q), chunk):
        x = q[s:s + chunk]
        d2 = (x * x).sum(1, keepdim=True) - 2.0 * (x @ b.T) + b_sq
        if len(exclude):
            d2[:, torch.from_numpy(exclude)] = float("inf")
        d, i = torch.topk(d2, k, dim=1, largest=False)
        out_d.append(d)
        out_i.append(i)
    return torch.cat(out_d).clamp_min_(0).sqrt_().numpy(), torch.cat(out_i).numpy()


def excluding_search(bank: np.ndarray, bound_dims: int = 256, candidates: int = 16, built: "MemoryBank | None" = None):
    """``search(queries, exclude, k) -> (distances, indices)``: :func:`search_excluding` over ``bank``,
    through :meth:`PrunedFlatSearch.search_excluding` when the bank is large enough for the bound to
    pay (the same rule as index.exact_search=auto), else by brute force. Same neighbours either way.

    ``built``: a MemoryBank over the same array whose pruned search has the same settings; its bound
    (principal axes, lifted rows) is used instead of being computed again: the same arithmetic on the
    same inputs, so the same results (the fit's calibration after its training patch-score sample)."""
    bank = np.ascontiguousarray(bank, dtype=np.float32)
    if len(bank) < PRUNE_MIN_ROWS or bank.shape[1] < 2 * bound_dims:
        return lambda q, exclude, k: search_excluding(bank, q, exclude, k)
    pruned = getattr(built, "_pruned", None)
    if pruned is not None and pruned.rows is bank and pruned.candidates == candidates \
            and pruned.axes.shape[1] == min(bound_dims, bank.shape[1]) - 1:
        return pruned.search_excluding
    flat = _faiss().IndexFlatL2(bank.shape[1])
    flat.add(bank)
    return PrunedFlatSearch(bank, flat, bound_dims, candidates).search_excluding


def index_holds(index, bank: np.ndarray, probes: int = 8) -> bool:
    """Whether ``index`` was built over ``bank``: a few rows spread over the bank are stored under their
    own ids, as the index encodes them (exactly for flat and HNSW storage; for IVF-PQ the row's own
    encoding). Catches a foreign index of the same shape, which would score against other data."""
    faiss = _faiss()
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


class PrunedFlatSearch:
    """Exact k-NN on the CPU with fewer flops than brute force: lower bounds, exact re-rank, proof.

    Centre the bank and take an orthonormal basis whose first r axes are its principal axes. For a
    query q and a bank row b, split both into the r leading coordinates and the residual; then

        ||q - b||^2 = ||q_r - b_r||^2 + ||q_res - b_res||^2 >= ||q_r - b_r||^2 + (||q_res|| - ||b_res||)^2,

    which is the squared distance between the (r + 1)-vectors [q_r, ||q_res||] and [b_r, ||b_res||].
    So one faiss flat search in ``bound_dims = r + 1`` dimensions (4x fewer flops than D = 1024 at
    the default 256) returns the ``candidates`` rows of smallest bound; faiss then measures the exact
    distance to each. Every row outside the candidates has a bound >= the largest candidate bound L,
    so if the k-th exact distance among the candidates is <= L the candidates hold the true k nearest
    rows. Queries without that proof (a few percent; see benchmarks/scoring.py) get a second chance
    with 4x the candidates; what is still unproven is searched brute-force.
    Results equal faiss ``IndexFlatL2`` up to float32 rounding: ``margin`` absorbs the rounding of the
    bound, and a proof that rounding defeats can only return a distance larger than the true nearest
    by that rounding. The residual norm is sqrt(||c||^2 - ||c_r||^2), accurate in float32 while the
    residual keeps a fair share of a row's centred energy (Lite0 features keep ~3.6 % beyond r = 255).
    We wrote this ourselves: faiss offers the pieces (flat search, subset distances) but no exact
    search with a certificate; its PCA + refine indexes are approximate.
    """

    def __init__(self, bank: np.ndarray, flat_index, bound_dims: int = 256, candidates: int = 16,
                 sample: int = 16384, seed: int = 0, margin: float = 1e-4, adaptive: bool = False):
        faiss = _faiss()
        self.adaptive = adaptive
        # adaptive search's decisions (counters, for tests and benchmarks): blocks pruned / brute-forced
        self.pruned_blocks = 0
        self.brute_blocks = 0
        bound_dims = min(bound_dims, bank.shape[1])
        self.flat = flat_index
        self.candidates = candidates
        self.margin = margin
        rows = bank if len(bank) <= sample else bank[np.random.default_rng(seed).choice(len(bank), sample, False)]
        self.mean = bank.mean(0, dtype=np.float64)
        centred = rows - self.mean
        _, vectors = np.linalg.eigh(centred.T @ centred)  # float64; any orthonormal basis is valid
        self.axes = np.ascontiguousarray(vectors[:, ::-1][:, :bound_dims - 1], dtype=np.float32)
        self.mean = self.mean.astype(np.float32)
        self.mean_lead = self.mean @ self.axes
        self.mean_norm2 = float(self.mean @ self.mean)
        lifted, norms = self._lift(bank)
        self.bound = faiss.IndexFlatL2(bound_dims)
        self.bound.add(lifted)
        self.max_norm = float(norms.max())
        self.rows = bank  # for search_excluding: the bank (a reference) and its lifted rows
        self.lifted = torch.from_numpy(lifted)
        self.lifted_sq = (self.lifted * self.lifted).sum(1)

    def _lift(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[N, D] -> [N, r + 1] = [leading coordinates, residual norm], and the centred norms [N].

        Centred without a centred copy of x: (x - m) A = x A - m A and ||x - m||^2 = ||x||^2 - 2 x.m + ||m||^2.
        x.m is a separate matrix-vector product: as an extra GEMM column it is a little faster but its
        rounding error is 3-5x larger, and the last formula cancels when ||m|| is large.
        """
        lifted = np.empty((len(x), self.axes.shape[1] + 1), dtype=np.float32)
        lead = np.matmul(x, self.axes, out=lifted[:, :-1])
        lead -= self.mean_lead
        norm2 = np.einsum("ij,ij->i", x, x) - 2.0 * (x @ self.mean) + self.mean_norm2
        lifted[:, -1] = np.sqrt(np.maximum(norm2 - np.einsum("ij,ij->i", lead, lead), 0))
        return lifted, np.sqrt(np.maximum(norm2, 0))

    def _candidates(self, q: np.ndarray, lifted: np.ndarray, norms: np.ndarray, k: int, c: int):
        """The c rows of smallest bound, measured exactly: k best (squared distances, indices), and proven."""
        bounds, labels = self.bound.search(lifted, c)
        d2, idx, proven = self._measured(q, labels, bounds[:, -1], self.margin * (norms + self.max_norm) ** 2, k)
        return d2, idx, proven | (c == self.flat.ntotal)  # every row measured exactly: nothing to prove

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Squared distances [N, k], indices [N, k], and how many queries were searched in full.

        Adaptive (``adaptive=True``, exact_search=auto): the bound pays only while it proves most
        answers; on patches far from the bank (a defect-heavy batch, another product) it proves few,
        and pruning then costs nearly twice brute force. So each call probes the bound on one query in
        :data:`PROBE_EVERY` and, per block of :data:`BLOCK_ROWS` queries, prunes the block only if its
        probes were mostly proven (:data:`MAX_FIRST_UNPROVEN`), else searches it brute force: a far
        batch pays only the probes, a mixed one prunes its in-distribution blocks. Either path returns
        brute force's neighbours; only the cost differs.
        """
        if not self.adaptive:
            return self._search_pruned(q, k)
        prune = self._blocks_to_prune(q, k)
        self.pruned_blocks += int(prune.sum())
        self.brute_blocks += int(len(prune) - prune.sum())
        if prune.all():
            return self._search_pruned(q, k)
        if not prune.any():
            d2, idx = self.flat.search(q, k)
            return d2, idx, len(q)
        rows = np.repeat(prune, BLOCK_ROWS)[:len(q)]
        d2 = np.empty((len(q), k), dtype=np.float32)
        idx = np.empty((len(q), k), dtype=np.int64)
        d2[rows], idx[rows], unproven = self._search_pruned(np.ascontiguousarray(q[rows]), k)
        d2[~rows], idx[~rows] = self.flat.search(np.ascontiguousarray(q[~rows]), k)
        return d2, idx, unproven + int((~rows).sum())

    def _blocks_to_prune(self, q: np.ndarray, k: int) -> np.ndarray:
        """Per block of :data:`BLOCK_ROWS` queries, whether the bound's first pass proved enough of the
        block's probes (every :data:`PROBE_EVERY`-th query) for pruning to beat brute force."""
        probes = np.arange(0, len(q), PROBE_EVERY)
        sample = np.ascontiguousarray(q[probes])
        lifted, norms = self._lift(sample)
        _, _, proven = self._candidates(sample, lifted, norms, k, min(self.candidates + k - 1, self.flat.ntotal))
        blocks = -(-len(q) // BLOCK_ROWS)
        block = probes // BLOCK_ROWS
        unproven = np.bincount(block, weights=~proven, minlength=blocks)
        return unproven <= MAX_FIRST_UNPROVEN * np.bincount(block, minlength=blocks)

    def search_excluding(self, q: np.ndarray, exclude: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """:func:`search_excluding` (distances, not squared) through the bound. The bound of every
        query to every row comes from one masked GEMM in ``bound_dims`` dimensions (a quarter of the
        exact one's flops at the default); the rows of smallest bound are measured exactly, first
        ``candidates + k - 1`` of them, then 4x as many for the queries without a proof; the queries
        still unproven are searched by the exact masked GEMM. Every row outside a query's candidates
        that is not excluded has a bound at least the largest candidate bound, so the proof is that
        of :meth:`_candidates`."""
        exclude = np.asarray(exclude, np.int64)
        if len(exclude) >= len(self.rows):
            exclude = exclude[:0]
        q = np.ascontiguousarray(q, dtype=np.float32)
        allowed = len(self.rows) - len(exclude)
        c = min(self.candidates + k - 1, allowed)
        if c <= k or len(q) == 0:
            return search_excluding(self.rows, q, exclude, k)
        lq, norms = self._lift(q)
        lb, lqt = self.lifted, torch.from_numpy(lq)
        d2 = torch.addmm(self.lifted_sq[None, :], lqt, lb.T, beta=1.0, alpha=-2.0)
        d2.add_((lqt * lqt).sum(1, keepdim=True))
        if len(exclude):
            d2[:, torch.from_numpy(exclude)] = float("inf")
        wide = min(4 * c, allowed)
        bounds, labels = (t.numpy() for t in torch.topk(d2, wide, dim=1, largest=False))
        del d2
        slack = self.margin * (norms + self.max_norm) ** 2
        d2k = np.empty((len(q), k), np.float32)
        idx = np.empty((len(q), k), np.int64)
        todo = np.arange(len(q))
        for width in (c, wide) if wide > c else (c,):
            d2k[todo], idx[todo], proven = self._measured(q[todo], labels[todo, :width], bounds[todo, width - 1],
                                                          slack[todo], k)
            todo = todo[~proven]
            if not len(todo):
                break
        d = np.sqrt(np.maximum(d2k, 0))
        if len(todo):
            d[todo], idx[todo] = search_excluding(self.rows, q[todo], exclude, k)
        return d, idx

    def _measured(self, q: np.ndarray, labels: np.ndarray, largest_bound: np.ndarray, slack: np.ndarray, k: int):
        """Exact squared distances to the candidate rows ``labels``: the k smallest, and whether each
        query's k-th is proven (no larger than every bound outside the candidates)."""
        faiss = _faiss()
        labels = np.ascontiguousarray(labels)
        exact = np.empty(labels.shape, dtype=np.float32)
        q = np.ascontiguousarray(q)
        self.flat.compute_distance_subset(len(q), faiss.swig_ptr(q), labels.shape[1], faiss.swig_ptr(exact),
                                          faiss.swig_ptr(labels))
        order = np.argsort(exact, axis=1, kind="stable")[:, :k]
        d2 = np.take_along_axis(exact, order, 1)
        return d2, np.take_along_axis(labels, order, 1), d2[:, -1] <= largest_bound - slack

    def _search_pruned(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, int]:
        """The pruned search of every query: bound, candidates, a wider second chance, brute force for the rest."""
        c = min(self.candidates + k - 1, self.flat.ntotal)
        lifted, norms = self._lift(q)
        d2, idx, proven = self._candidates(q, lifted, norms, k, c)
        unproven = np.flatnonzero(~proven)
        wider = min(4 * c, self.flat.ntotal)
        if len(unproven) and wider > c:  # a second chance with 4x the candidates (a quarter of brute force)
            d2[unproven], idx[unproven], proven = self._candidates(q[unproven], lifted[unproven], norms[unproven],
                                                                   k, wider)
            unproven = unproven[~proven]
        if len(unproven):
            d2[unproven], idx[unproven] = self.flat.search(np.ascontiguousarray(q[unproven]), k)
        return d2, idx, len(unproven)


class MemoryBank:
    """Nearest-neighbour search over the memory bank: exact, or through an approximate faiss index."""

    def __init__(self, bank: np.ndarray, device: str = "cpu", precision: str = "fp32", index=None,
                 exact_search: str = "auto", bound_dims: int = 256, candidates: int = 16):
        self.bank = np.ascontiguousarray(bank, dtype=np.float32)
        if self.bank.ndim != 2 or len(self.bank) == 0:
            raise ValueError(f"memory bank must be a non-empty [K, D] matrix, got {self.bank.shape}")
        self.device = torch.device(device)
        self._index = None
        self._bank_t = None
        self._pruned = None
        self.unproven = 0  # queries the pruned search had to search in full (counter, for benchmarks)
        # GPU torch search only: "fp32" exact, "tf32" tensor-core matmul (see benchmarks/).
        self.precision = precision
        faiss = _faiss()
        flat = isinstance(index, faiss.IndexFlatL2) and index.ntotal == len(self.bank)
        if index is not None and not isinstance(index, faiss.IndexFlat):
            self._index = index  # approximate search on the CPU, whatever the device
            self.backend = f"faiss-cpu-{type(index).__name__}"
        elif self.device.type == "cuda" and faiss_gpus() == 0:
            self._bank_t = torch.from_numpy(self.bank).to(self.device)
            self._bank_sq = (self._bank_t * self._bank_t).sum(1)
            self.backend = "torch-cuda"
        else:
            if not flat:  # the model's own flat index is used as it is
                index = faiss.IndexFlatL2(self.bank.shape[1])
                index.add(self.bank)
            if self.device.type == "cuda":
                res = faiss.StandardGpuResources()
                index = faiss.index_cpu_to_gpu(res, self.device.index or 0, index)
                self._res = res
                self.backend = "faiss-gpu"
            else:
                self.backend = "faiss-cpu"
                if exact_search == "pruned" or (exact_search == "auto" and len(self.bank) >= PRUNE_MIN_ROWS
                                                and self.bank.shape[1] >= 2 * bound_dims):
                    self._pruned = PrunedFlatSearch(self.bank, index, bound_dims, candidates,
                                                    adaptive=exact_search == "auto")
                    self.backend = "faiss-cpu-pruned"
            self._index = index

    @classmethod
    def from_config(cls, bank: np.ndarray, config, device: str = "cpu", index=None) -> "MemoryBank":
        """The memory bank searched with a run's settings (runtime.search_precision, index.exact_search, ...)."""
        ix = config.index
        return cls(bank, device, config.runtime.search_precision, index, ix.exact_search, ix.bound_dims,
                   ix.bound_candidates)

    @property
    def dim(self) -> int:
        return self.bank.shape[1]

    def __len__(self) -> int:
        return len(self.bank)

    def search(self, queries: torch.Tensor | np.ndarray, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Euclidean distances [N, k] and indices [N, k] of the k nearest memory-bank rows."""
        k = min(k, len(self.bank))
        if self._bank_t is not None:
            q = torch.as_tensor(queries).to(self.device, torch.float32)
            return self._torch_search(q, k)
        q = np.ascontiguousarray(torch.as_tensor(queries).detach().float().cpu().numpy())
        if self._pruned is not None and len(q):
            d2, idx, unproven = self._pruned.search(q, k)
            self.unproven += unproven
        else:
            d2, idx = self._index.search(q, k)
        return torch.from_numpy(np.sqrt(np.maximum(d2, 0))), torch.from_numpy(idx)

    def _torch_search(self, q: torch.Tensor, k: int):
        """||a - b||^2 = ||a||^2 + (||b||^2 - 2 a.b): one GEMM with the bank norms as its bias, the
        minimum over the bank, then ||a||^2 added to the k winners only (it does not change the order).

        With precision "tf32" the GEMM only nominates ``k + TF32_EXTRA_CANDIDATES`` rows per query;
        their distances are then measured in full float32 (:func:`remeasure`), so the returned
        distances are float32-exact and only a neighbour that tf32 rounding pushes behind that many
        others could be missed (as with faiss' refine indexes)."""
        if len(q) == 0:
            return q.new_zeros((0, k)), torch.zeros((0, k), dtype=torch.long, device=q.device)
        tf32 = self.precision == "tf32"
        c = min(len(self.bank), k + TF32_EXTRA_CANDIDATES) if tf32 else k
        dists, idxs = [], []
        chunk = max(256, (1 << 28) // len(self.bank))  # about 1 GiB of float32 distances per chunk
        for s in range(0, len(q), chunk):
            a = q[s:s + chunk]
            with fp32_arithmetic(matmul=tf32):
                d2 = torch.addmm(self._bank_sq[None, :], a, self._bank_t.T, beta=1.0, alpha=-2.0)
            if c == 1:
                v, i = d2.min(1, keepdim=True)
            else:
                v, i = torch.topk(d2, c, dim=1, largest=False)
            del d2
            if tf32:
                v, i = remeasure(a, self._bank_t, i, k)
            else:
                v = v.add_((a * a).sum(1, keepdim=True))
            dists.append(v.clamp_min_(0).sqrt_())
            idxs.append(i)
        return torch.cat(dists), torch.cat(idxs)


def remeasure(queries: torch.Tensor, bank: torch.Tensor, candidates: torch.Tensor, k: int,
              rows_per_step: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared float32 distances of each query to its candidate rows [N, c], the k smallest, sorted."""
    out_d, out_i = [], []
    for s in range(0, len(queries), rows_per_step):
        a, cand = queries[s:s + rows_per_step], candidates[s:s + rows_per_step]
        d2 = ((bank[cand] - a[:, None, :]) ** 2).sum(-1)  # elementwise: no tf32 involved
        v, order = torch.topk(d2, k, dim=1, largest=False)
        out_d.append(v)
        out_i.append(cand.gather(1, order))
    return torch.cat(out_d), torch.cat(out_i)
