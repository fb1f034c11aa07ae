"""Memory bank and nearest-neighbour search.

The memory bank is a float32 matrix [K, D]; search is exact L2 (faiss ``IndexFlatL2``), on the GPU
when the installed faiss supports it, else faiss on the CPU. Without faiss GPU support but with a
CUDA device, a chunked torch matmul search with a fused top-k gives the same distances on the GPU.
Distances returned are Euclidean (faiss returns squared L2; we take the square root).
"""
from __future__ import annotations

import logging

import numpy as np
import torch

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


class MemoryBank:
    """Exact nearest-neighbour search over the memory bank."""

    def __init__(self, bank: np.ndarray, device: str = "cpu", precision: str = "fp32"):
        self.bank = np.ascontiguousarray(bank, dtype=np.float32)
        if self.bank.ndim != 2 or len(self.bank) == 0:
            raise ValueError(f"memory bank must be a non-empty [K, D] matrix, got {self.bank.shape}")
        self.device = torch.device(device)
        self._index = None
        self._bank_t = None
        # GPU torch search only: "fp32" exact, "tf32" tensor-core matmul (see benchmarks/).
        self.precision = precision
        if self.device.type == "cuda" and faiss_gpus() == 0:
            self._bank_t = torch.from_numpy(self.bank).to(self.device)
            self._bank_sq = (self._bank_t * self._bank_t).sum(1)
            self.backend = "torch-cuda"
        else:
            faiss = _faiss()
            index = faiss.IndexFlatL2(self.bank.shape[1])
            index.add(self.bank)
            if self.device.type == "cuda":
                res = faiss.StandardGpuResources()
                index = faiss.index_cpu_to_gpu(res, self.device.index or 0, index)
                self._res = res
                self.backend = "faiss-gpu"
            else:
                self.backend = "faiss-cpu"
            self._index = index

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
        q = torch.as_tensor(queries).detach().float().cpu().numpy()
        d2, idx = self._index.search(np.ascontiguousarray(q), k)
        return torch.from_numpy(np.sqrt(np.maximum(d2, 0))), torch.from_numpy(idx)

    def _torch_search(self, q: torch.Tensor, k: int):
        """||a - b||^2 = ||a||^2 + (||b||^2 - 2 a.b): one GEMM with the bank norms as its bias, the
        minimum over the bank, then ||a||^2 added to the k winners only (it does not change the order)."""
        dists, idxs = [], []
        chunk = max(256, (1 << 28) // len(self.bank))  # about 1 GiB of float32 distances per chunk
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.precision == "tf32"
        try:
            for s in range(0, len(q), chunk):
                a = q[s:s + chunk]
                d2 = torch.addmm(self._bank_sq[None, :], a, self._bank_t.T, beta=1.0, alpha=-2.0)
                if k == 1:
                    v, i = d2.min(1, keepdim=True)
                else:
                    v, i = torch.topk(d2, k, dim=1, largest=False)
                v = v.add_((a * a).sum(1, keepdim=True))
                dists.append(v.clamp_min_(0).sqrt_())
                idxs.append(i)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
        return torch.cat(dists), torch.cat(idxs)

    def serialize(self) -> bytes:
        """The index in faiss's own format (a CPU flat index over the bank)."""
        faiss = _faiss()
        index = faiss.IndexFlatL2(self.dim)
        index.add(self.bank)
        return faiss.serialize_index(index).tobytes()

    @staticmethod
    def deserialize_bank(data: bytes) -> np.ndarray:
        faiss = _faiss()
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        return index.reconstruct_n(0, index.ntotal)


def search_reference(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Nearest distances by brute force in float32 torch (benchmark baseline and test oracle)."""
    return torch.cdist(queries.float(), bank.float()).min(1).values
