"""Exact k-NN pieces shared by the CPU searches: candidates measured in float32 with a proof, and a
bfloat16 brute force that nominates the candidates.

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
    import faiss
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
        d2 = np.empty((len(q), k), np.float32)
        idx = np.empty((len(q), k), np.int64)
        proven = np.empty(len(q), bool)
        for s in range(0, len(q), self.chunk):
            part = q[s:s + self.chunk]
            d2[s:s + len(part)], idx[s:s + len(part)], proven[s:s + len(part)] = self._candidates(part, k, c)
        todo = np.flatnonzero(~proven)
        if len(todo):
            d2[todo], idx[todo] = self.flat.search(np.ascontiguousarray(q[todo]), k)
        return d2, idx, len(todo)

    def _candidates(self, q: np.ndarray, k: int, c: int):
        """The c rows of smallest approximate distance, measured exactly; the k best and their proof."""
        centred = torch.from_numpy(q - self.mean)
        q_sq = (centred * centred).sum(1)
        approx = torch.add(self.sq[None, :], torch.mm(centred.bfloat16(), self.rows_t).float(), alpha=-2.0)
        bounds, labels = torch.topk(approx, c, dim=1, largest=False)
        norms = q_sq.sqrt().numpy()
        lower = bounds[:, -1].numpy() + q_sq.numpy() - 2.0 * self.eps * norms * self.max_norm
        slack = self.margin * (norms + self.max_norm) ** 2
        return measured(self.flat, q, labels.numpy(), lower, slack, k)
