"""The memory bank and its nearest-neighbour search.

The memory bank is a float32 matrix [K, D]; search is exact L2 (faiss ``IndexFlatL2``), on the GPU
when the installed faiss supports it, else faiss on the CPU. Without faiss GPU support but with a
CUDA device, a chunked torch matmul search with a fused top-k gives the same distances on the GPU.
On the CPU the exact search is faster and gives the same neighbours (:mod:`.exact_search`): the
bfloat16 brute force on CPUs that have it, the pruned search on large banks. An approximate faiss
index (:mod:`.index`) is searched as it is. Distances returned are Euclidean (faiss returns squared
L2; we take the square root).
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from .devices import fp32_arithmetic
from .exact_search import BF16_PRUNE_MIN_ROWS, PRUNE_MIN_ROWS, Bf16BruteForce, PrunedFlatSearch, native_bf16
from .index import faiss_gpus, faiss_module

log = logging.getLogger(__name__)

# tf32 search: candidates per query beyond k whose distances are re-measured in float32
TF32_EXTRA_CANDIDATES = 7


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
        self._bf16 = None
        self.unproven = 0  # queries the pruned search had to search in full (counter, for benchmarks)
        # "tf32": GPU tensor-core candidates; "bf16" (or "auto" on a CPU that has it): CPU bfloat16 candidates
        self.precision = precision
        faiss = faiss_module()
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
                self._cpu_exact(index, exact_search, bound_dims, candidates)
            self._index = index

    def _cpu_exact(self, index, exact_search: str, bound_dims: int, candidates: int) -> None:
        """The CPU's exact search: faiss float32 brute force, with bfloat16 candidates (runtime.search_precision)
        and the pruning bound (index.exact_search) in front of it where they apply."""
        self.backend = "faiss-cpu"
        if self.precision == "bf16" or (self.precision == "auto" and native_bf16()):
            self._bf16 = Bf16BruteForce(self.bank, index)
            self.backend = "faiss-cpu-bf16"
        min_rows = BF16_PRUNE_MIN_ROWS if self._bf16 is not None else PRUNE_MIN_ROWS
        if exact_search == "pruned" or (exact_search == "auto" and len(self.bank) >= min_rows
                                        and self.bank.shape[1] >= 2 * bound_dims):
            self._pruned = PrunedFlatSearch(self.bank, index, bound_dims, candidates,
                                            adaptive=exact_search == "auto", brute=self._bf16)
            self.backend += "-pruned"

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
        elif self._bf16 is not None and len(q):
            d2, idx, _ = self._bf16.search(q, k)
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
