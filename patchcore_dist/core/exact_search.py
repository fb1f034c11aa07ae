"""Exact k-NN on the CPU with fewer flops than brute force, neighbours equal to faiss ``IndexFlatL2``:
the pruned search (:class:`PrunedFlatSearch`, a lower bound in few dimensions), the search that leaves
a training image's own rows out (:func:`search_excluding`), and the bfloat16 brute force
(:class:`Bf16BruteForce`), each with candidates measured in float32 and a proof per query.

A CPU with native bfloat16 dot products (AVX512-BF16, AMX) runs the brute force's GEMM 3-4x faster in
bfloat16 than in float32 (784 x 1024 queries against 3,136 rows on one core of this project's AMD
EPYC: faiss float32 52 ms, torch bfloat16 16 ms; benchmarks/search.py). Its rounding is bounded, so
the bfloat16 product is used only to nominate candidates and to bound every other row from below:

    for centred rows q and b (the bank's mean subtracted: distances do not change), each product
    q_i b_i is off by at most (2u + u^2)|q_i b_i| after rounding both to bfloat16 (u = 2^-8); the
    float32 accumulation of D exact bfloat16 products adds at most gamma_D sum|q_i b_i|
    (gamma_D = D 2^-24 / (1 - D 2^-24), any summation order), and rounding the output to bfloat16
    u more; sum|q_i b_i| <= ||q|| ||b||. So |g - q.b| <= eps ||q|| ||b|| with eps below, and every
    row's squared distance is at least ||q||^2 + ||b||^2 - 2 g - 2 eps ||q|| max ||b||.

The ``candidates`` rows of smallest approximate distance are measured exactly (faiss, float32, the
pruned search's measurement); every other row's distance is at least the largest candidate's lower
bound, so when the k-th exact distance is no larger the candidates hold the true k nearest rows.
Queries without that proof (a few percent on real features) are searched by the float32 brute
force. The neighbours are those of faiss ``IndexFlatL2``; the distances are float32 measurements.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .index import faiss_module

U_BF16 = 2.0 ** -8
U_FP32 = 2.0 ** -24


def bf16_error(dim: int) -> float:
    """eps: the bfloat16 dot product's error bound relative to ||q|| ||b|| (see the module's docstring)."""
    gamma = dim * U_FP32 / (1 - dim * U_FP32)
    return (2 * U_BF16 + U_BF16 ** 2) + (gamma + U_BF16 * (1 + gamma)) * (1 + U_BF16) ** 2


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (else torch emulates it, slower than float32)."""
    cpu = getattr(torch, "cpu", None)
    check = getattr(cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(cpu, "_is_amx_tile_supported", None)
    return bool((check and check()) or (amx and amx()))


def measured(flat, q: np.ndarray, labels: np.ndarray, largest_bound: np.ndarray, slack: np.ndarray, k: int):
    """Exact squared distances of the queries ``q`` to their candidate rows ``labels`` of the flat index
    ``flat``: the k smallest (distances, indices), and whether each query's k-th is proven (no larger
    than ``largest_bound - slack``, a lower bound of every row outside its candidates)."""
    faiss = faiss_module()
    labels = np.ascontiguousarray(labels)
    exact = np.empty(labels.shape, dtype=np.float32)
    q = np.ascontiguousarray(q)
    flat.compute_distance_subset(len(q), faiss.swig_ptr(q), labels.shape[1], faiss.swig_ptr(exact),
                                 faiss.swig_ptr(labels))
    order = np.argsort(exact, axis=1, kind="stable")[:, :k]
    d2 = np.take_along_axis(exact, order, 1)
    return d2, np.take_along_axis(labels, order, 1), d2[:, -1] <= largest_bound - slack


class Bf16BruteForce:
    """Exact k-NN over a faiss flat index's rows: bfloat16 candidates, float32 measurement and proof.

    ``search(q, k) -> (squared distances [N, k], indices [N, k], queries searched in float32)``, the
    neighbours of ``flat.search``. Memory: the bank in bfloat16 (2 bytes a value) and one chunk of
    approximate distances (about 16 MB, and its bfloat16 and topk companions).
    """

    def __init__(self, bank: np.ndarray, flat, candidates: int = 8, margin: float = 1e-4):
        self.flat, self.candidates, self.margin = flat, candidates, margin
        self.rows = bank  # for search_excluding's float32 fallback (a reference)
        self.mean = bank.mean(0, dtype=np.float64).astype(np.float32)
        centred = torch.from_numpy(np.ascontiguousarray(bank, dtype=np.float32) - self.mean)
        self.rows_t = centred.bfloat16().T.contiguous()  # [D, K]
        self.sq = (centred * centred).sum(1)  # [K], float32
        self.max_norm = math.sqrt(float(self.sq.max()))
        self.eps = bf16_error(bank.shape[1])
        self.chunk = max(64, (1 << 22) // max(1, len(bank)))  # 16 MB of float32 approximations a step

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, int]:
        q = np.ascontiguousarray(q, dtype=np.float32)
        c = min(k + self.candidates, self.flat.ntotal)
        if c <= k or len(q) == 0:
            d2, idx = self.flat.search(q, k)
            return d2, idx, len(q)
        d2, idx, proven = self._proven(q, k, c, None)
        todo = np.flatnonzero(~proven)
        if len(todo):
            d2[todo], idx[todo] = self.flat.search(np.ascontiguousarray(q[todo]), k)
        return d2, idx, len(todo)

    def search_excluding(self, q: np.ndarray, exclude: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """:func:`search_excluding` (distances, not squared): the rows ``exclude`` never nominated, the
        queries without a proof searched by its float32 masked GEMM."""
        exclude = np.asarray(exclude, np.int64)
        if len(exclude) >= self.flat.ntotal:
            exclude = exclude[:0]
        q = np.ascontiguousarray(q, dtype=np.float32)
        c = min(k + self.candidates, self.flat.ntotal - len(exclude))
        if c <= k or len(q) == 0:
            return search_excluding(self.rows, q, exclude, k)
        d2, idx, proven = self._proven(q, k, c, exclude)
        d = np.sqrt(np.maximum(d2, 0))
        todo = np.flatnonzero(~proven)
        if len(todo):
            d[todo], idx[todo] = search_excluding(self.rows, q[todo], exclude, k)
        return d, idx

    def _proven(self, q: np.ndarray, k: int, c: int, exclude: np.ndarray | None):
        """:meth:`_candidates` over chunks of the queries: squared distances, indices, proven."""
        d2 = np.empty((len(q), k), np.float32)
        idx = np.empty((len(q), k), np.int64)
        proven = np.empty(len(q), bool)
        for s in range(0, len(q), self.chunk):
            part = slice(s, s + self.chunk)
            d2[part], idx[part], proven[part] = self._candidates(q[part], k, c, exclude)
        return d2, idx, proven

    def _candidates(self, q: np.ndarray, k: int, c: int, exclude: np.ndarray | None = None):
        """The c rows of smallest approximate distance (never an excluded one), measured exactly; the k
        best and their proof."""
        centred = torch.from_numpy(q - self.mean)
        q_sq = (centred * centred).sum(1)
        approx = torch.add(self.sq[None, :], torch.mm(centred.bfloat16(), self.rows_t).float(), alpha=-2.0)
        if exclude is not None and len(exclude):
            approx[:, torch.from_numpy(exclude)] = float("inf")
        bounds, labels = torch.topk(approx, c, dim=1, largest=False)
        norms = q_sq.sqrt().numpy()
        lower = bounds[:, -1].numpy() + q_sq.numpy() - 2.0 * self.eps * norms * self.max_norm
        slack = self.margin * (norms + self.max_norm) ** 2
        return measured(self.flat, q, labels.numpy(), lower, slack, k)


# exact_search=auto prunes banks from this many rows (below, brute force is already fast); with the
# bfloat16 brute force, from BF16_PRUNE_MIN_ROWS (one core, 1024-d Lite0 patches near the bank: bfloat16
# brute force 21.7 / 72 ms an image at 3,136 / 9,408 rows, pruned 28 / 53 ms: even near 4,800 rows)
PRUNE_MIN_ROWS = 2048
BF16_PRUNE_MIN_ROWS = 4800
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


def excluding_search(bank: np.ndarray, bound_dims: int = 256, candidates: int = 16, built=None,
                     precision: str = "fp32"):
    """``search(queries, exclude, k) -> (distances, indices)``: :func:`search_excluding` over ``bank``,
    through :meth:`PrunedFlatSearch.search_excluding` when the bank is large enough for the bound to
    pay (the same rule as index.exact_search=auto), else by brute force. Same neighbours either way.

    ``built``: a MemoryBank over the same array whose pruned search has the same settings; its bound
    (principal axes, lifted rows) is used instead of being computed again: the same arithmetic on the
    same inputs, so the same results (the fit's calibration after its training patch-score sample).
    ``precision`` (runtime.search_precision): with bfloat16 candidates (:class:`Bf16BruteForce`), banks
    under :data:`BF16_PRUNE_MIN_ROWS` are searched by them instead of the masked float32 GEMM or the bound."""
    bank = np.ascontiguousarray(bank, dtype=np.float32)
    bf16 = precision == "bf16" or (precision == "auto" and native_bf16())
    small = len(bank) < (BF16_PRUNE_MIN_ROWS if bf16 else PRUNE_MIN_ROWS) or bank.shape[1] < 2 * bound_dims
    if small and bf16:
        brute = getattr(built, "_bf16", None)
        if brute is None or brute.rows is not bank:
            flat = faiss_module().IndexFlatL2(bank.shape[1])
            flat.add(bank)
            brute = Bf16BruteForce(bank, flat)
        return brute.search_excluding
    if small:
        return lambda q, exclude, k: search_excluding(bank, q, exclude, k)
    pruned = getattr(built, "_pruned", None)
    if pruned is not None and pruned.rows is bank and pruned.candidates == candidates \
            and pruned.axes.shape[1] == min(bound_dims, bank.shape[1]) - 1:
        return pruned.search_excluding
    flat = faiss_module().IndexFlatL2(bank.shape[1])
    flat.add(bank)
    return PrunedFlatSearch(bank, flat, bound_dims, candidates).search_excluding



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
                 sample: int = 16384, seed: int = 0, margin: float = 1e-4, adaptive: bool = False,
                 brute: Bf16BruteForce | None = None):
        faiss = faiss_module()
        self.adaptive = adaptive
        self.brute = brute  # the brute force of the queries the bound leaves (else faiss float32)
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
            d2, idx = self._brute_force(q, k)
            return d2, idx, len(q)
        rows = np.repeat(prune, BLOCK_ROWS)[:len(q)]
        d2 = np.empty((len(q), k), dtype=np.float32)
        idx = np.empty((len(q), k), dtype=np.int64)
        d2[rows], idx[rows], unproven = self._search_pruned(np.ascontiguousarray(q[rows]), k)
        d2[~rows], idx[~rows] = self._brute_force(np.ascontiguousarray(q[~rows]), k)
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
        return measured(self.flat, q, labels, largest_bound, slack, k)

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
            d2[unproven], idx[unproven] = self._brute_force(np.ascontiguousarray(q[unproven]), k)
        return d2, idx, len(unproven)

    def _brute_force(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.brute.search(q, k)[:2] if self.brute is not None else self.flat.search(q, k)
