"""Greedy k-center coreset ("farthest point first") on randomly projected features (PatchCore 3.2).

Memory is O(N x projection_dim): the projected matrix, its squared norms and a few vectors over N.
On the CPU the traversal is pruned exactly (:class:`_PrunedTraversal`): a new centre only
re-measures the points that a lower bound (their distance on a few principal axes) cannot prove to
stay at least as close to the centres chosen before; the measured points get the same float32
arithmetic as the dense step (:func:`_cpu_step`), so the selection is that of the dense loop. On a
GPU the dense loop runs without synchronising with the host: the selected index stays on the device.
"""
from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from .devices import pick_device

log = logging.getLogger(__name__)
GRAPH_STEPS = 256
PAD_BLOCK = 64  # BLAS operands padded to a multiple of this many rows: every row takes the same kernel path
EPS32 = 2.0 ** -24
BOUND_DIM = 16  # principal axes of the pruning bound


def coreset_size(n: int, ratio: float = 0.1, size: int | None = None) -> int:
    if n <= 0:
        raise ValueError("no patch features to select from")
    k = size if size is not None else int(math.ceil(n * ratio))
    return max(1, min(n, k))


def projection_matrix(dim: int, projection_dim: int, seed: int = 0) -> torch.Tensor | None:
    """A Gaussian Johnson-Lindenstrauss projection [dim, projection_dim]; None when no reduction is needed."""
    if projection_dim >= dim:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randn(dim, projection_dim, generator=g) / math.sqrt(projection_dim)


def project(features: torch.Tensor | np.ndarray, matrix: torch.Tensor | None) -> torch.Tensor:
    x = torch.as_tensor(features).float()
    if matrix is None:
        return x
    if x.device.type == "cpu":  # numpy's OpenBLAS: ~1.4x torch's CPU BLAS on this kind of product
        return torch.from_numpy(x.numpy() @ matrix.numpy())
    return x @ matrix.to(x.device)


def greedy_coreset(projected: torch.Tensor, k: int, seed: int = 0, num_starting_points: int = 10,
                   device: str | torch.device = "auto", progress_every: float = 10.0,
                   return_distances: bool = False, pruned: bool = True):
    """Select k row indices of ``projected`` [N, d] by greedy k-center.

    Started like the original approximate sampler: each point's initial distance is its mean
    distance to ``num_starting_points`` random points; then repeatedly take the farthest point
    and lower every distance to the new centre. Returns int64 indices in selection order (and,
    optionally, the final distance of every point to its nearest selected point). ``pruned=False``
    runs the dense CPU loop (every point re-measured every step): the oracle of the pruned one.
    """
    dev = device if isinstance(device, torch.device) else pick_device(device)
    x = projected.to(dev, torch.float32)
    k = min(int(k), x.shape[0])
    sq, min_dist = _starting_distances(x, seed, num_starting_points)
    selected = torch.empty(k, dtype=torch.long, device=dev)
    if dev.type == "cpu" and pruned:
        step, slots = _PrunedTraversal(x, sq, min_dist, selected), range(k)
        del x
    elif dev.type == "cpu":
        step, slots = _cpu_step(x, sq, min_dist, selected), range(k)
        del x  # the step keeps its transposed copy only
    else:
        step, slots = _device_step(x, sq, min_dist), selected
    done = _replay_in_graphs(step, selected, k) if dev.type == "cuda" and k >= 4 * GRAPH_STEPS else 0
    # The pruned steps are many small products: BLAS threads cost more to wake than they save
    # (and a padded block gives the same bits on one thread as on several).
    with threadpool_limits(1 if dev.type == "cpu" and pruned else None, user_api="blas"):
        _run_steps(step, slots, done, k, progress_every if dev.type == "cpu" else 0.0)
    out = selected.cpu()
    if return_distances:
        return out, (min_dist.clamp_min(0).sqrt() if dev.type == "cpu" else min_dist).cpu()
    return out


def _run_steps(step, slots, start: int, k: int, progress_every: float) -> None:
    t0 = last = time.time()
    for i in range(start, k):
        step(slots[i])
        if progress_every and time.time() - last > progress_every:
            last = time.time()
            log.info("coreset: %d / %d selected (%.0f%%), %.1f s", i + 1, k, 100.0 * (i + 1) / k, last - t0)


def _starting_distances(x: torch.Tensor, seed: int, num_starting_points: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared norms [N] and each row's mean distance to the random starting rows [N], without an N x N matrix."""
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    starts = torch.as_tensor(rng.choice(n, size=min(num_starting_points, n), replace=False), device=x.device)
    sq = (x * x).sum(1)
    d2 = (sq[:, None] - 2.0 * x @ x[starts].T + sq[starts][None, :]).clamp_min_(0)
    return sq, d2.sqrt_().mean(1)


def _cpu_step(x: torch.Tensor, sq: torch.Tensor, min_dist: torch.Tensor, selected: torch.Tensor):
    """One dense greedy step on the CPU (the oracle of :class:`_PrunedTraversal`), as a function of
    the slot it fills.

    Squared distances are kept (same order, no square roots) to save passes over N, so ``min_dist``
    is squared in place. The step runs on numpy views of the same memory: a numpy call costs a
    fraction of a torch dispatch. The products are matrix-vector products over rows (:func:`_row_dots`,
    the arithmetic the pruned traversal repeats on the rows it measures).
    """
    n = x.shape[0]
    rows = _padded_rows(x.numpy())
    min_dist.square_()
    sq_np, dist_np, selected_np = sq.numpy(), min_dist.numpy(), selected.numpy()
    product = np.empty(len(rows), np.float32)
    new_np = product[:n]

    def step(slot: int) -> None:
        idx = int(dist_np.argmax())
        selected_np[slot] = idx
        np.dot(rows, rows[idx], out=product)
        np.multiply(new_np, -2.0, out=new_np)
        np.add(new_np, sq_np, out=new_np)
        np.add(new_np, sq_np[idx], out=new_np)
        np.minimum(dist_np, new_np, out=dist_np)
    return step


def _padded_rows(x: np.ndarray) -> np.ndarray:
    """The rows [N, d] with zero rows appended up to a multiple of PAD_BLOCK (see :func:`_row_dots`)."""
    rows = np.zeros((_padded(len(x)), x.shape[1]), np.float32)
    rows[:len(x)] = x
    return rows


def _row_dots(rows: np.ndarray, centre: np.ndarray, points: np.ndarray) -> np.ndarray:
    """rows[points] . centre, with the bits of the full product ``rows @ centre``.

    A matrix-vector product over rows computes each row's dot product alone, in the same order,
    whatever the rows around it, as long as every row takes the kernel's main path: OpenBLAS handles
    the last rows of an odd-sized operand with other code (which made equal rows get unequal
    distances and ties depend on position). So the gathered rows are padded to a multiple of
    PAD_BLOCK, as the full matrix is. A gather of rows is a copy of contiguous rows: about 10x
    cheaper per point than gathering columns of a transposed matrix.
    """
    idx = np.zeros(_padded(len(points)), np.int64)
    idx[:len(points)] = points
    return np.dot(rows[idx], centre)[:len(points)]


def _padded(n: int) -> int:
    return -(-n // PAD_BLOCK) * PAD_BLOCK


class _PrunedTraversal:
    """The CPU greedy step, pruned exactly by a lower bound; called like :func:`_cpu_step`.

    A point needs re-measuring against the new centre c only if its computed squared distance to c
    could come out below its current one (the dense step's ``minimum`` leaves every other point as it
    is). The bound: the distance between the points' coordinates on BOUND_DIM principal axes (an
    orthogonal projection never lengthens a distance), one product over an N x BOUND_DIM matrix
    instead of N x d. It leaves a few per cent of the points on real patch features (2-5 % late in
    a 10 % coreset); the bound and the dense formula's own float32 rounding are both accounted
    for (``tau`` terms, see :meth:`_thresholds`), so a skipped point provably keeps its distance. The
    measured points get the dense step's product (:func:`_row_dots`: the same BLAS kernel on rows
    padded to PAD_BLOCK, the same float32 operations in the same order), so the argmax sequence is
    the dense loop's.
    """

    def __init__(self, x: torch.Tensor, sq: torch.Tensor, min_dist: torch.Tensor, selected: torch.Tensor):
        n, d = x.shape
        self.x = _padded_rows(x.numpy())  # rows, for gathering the points to measure
        self.tau = 4.0 * (2 * d + 4) * EPS32  # |computed - exact| squared distance <= tau (|p|^2 + |c|^2)
        min_dist.square_()
        self.sq, self.dist, self.selected = sq.numpy(), min_dist.numpy(), selected.numpy()
        self.sq64 = self.sq.astype(np.float64)
        self.axes = _principal_coordinates(self.x[:n], min(BOUND_DIM, d))  # [m, N_padded] float32
        m = len(self.axes)
        self.tau_m = 8.0 * (2 * m + 4) * EPS32
        self.norm_p = np.sqrt(np.einsum("ij,ij->j", self.axes, self.axes, dtype=np.float64))[:n]
        self.sq_p = (self.norm_p * self.norm_p).astype(np.float32)
        self.h = np.zeros(_padded(n), np.float32)  # measure p iff 2 p.c - h[p] > |c|^2 on the axes
        self.h[n:] = np.inf
        self.g = np.empty(_padded(n), np.float32)
        self.measured = 0  # points measured over all steps (the dense loop: k x N)

    def __call__(self, slot: int) -> None:
        n = len(self.dist)
        idx = int(self.dist.argmax())
        self.selected[slot] = idx
        if slot == 0:
            todo = np.arange(n)
        else:
            np.dot(self.axes[:, idx], self.axes, out=self.g)
            np.multiply(self.g, 2.0, out=self.g)
            np.subtract(self.g, self.h, out=self.g)
            todo = np.flatnonzero(self.g > self.sq_p[idx])
        self.measured += len(todo)
        new = self._distances(idx, todo)
        closer = np.flatnonzero(new < self.dist[todo]) if slot else np.arange(n)
        moved = todo[closer]
        self.dist[moved] = np.minimum(self.dist[moved], new[closer])
        self.h[moved] = self._thresholds(moved)

    def _thresholds(self, points: np.ndarray) -> np.ndarray:
        """h[p] such that 2 p.c - h[p] <= |c|^2 (float32, on the axes) proves that p's computed squared
        distance to c is >= dist[p]. With a, b the axes' coordinates and D the distance: the dense
        formula errs by at most tau (|p|^2 + |c|^2), the axes' product by tau_m (|a|^2 + |b|^2), their
        float32 rounding by 1.01 eps (|a| + |b|); the centre's norms are bounded by the largest ones."""
        t = np.maximum(self.dist[points], 0).astype(np.float64) + self.tau * (self.sq64[points] + self.sq64.max())
        b = 1.01 * EPS32 * (self.norm_p[points] + self.norm_p.max())
        sqp = self.sq_p[points].astype(np.float64)
        need = (np.sqrt(t) * (1.0 + 1e-9) + b) ** 2 + self.tau_m * (sqp + float(self.sq_p.max()))
        h = sqp - need
        return (h - self.tau_m * (np.abs(h) + sqp + float(self.sq_p.max()))).astype(np.float32)

    def _distances(self, idx: int, todo: np.ndarray) -> np.ndarray:
        """|p|^2 - 2 p.c + |c|^2 in float32 exactly as :func:`_cpu_step` computes it."""
        n = len(self.dist)
        if len(todo) > n // 2:  # most rows: the full product is cheaper than the gather
            dot = np.dot(self.x, self.x[idx])[:n][todo]
        else:
            dot = _row_dots(self.x, self.x[idx], todo)
        np.multiply(dot, -2.0, out=dot)
        np.add(dot, self.sq[todo], out=dot)
        np.add(dot, self.sq[idx], out=dot)
        return dot


def _principal_coordinates(x: np.ndarray, m: int, sample: int = 20_000) -> np.ndarray:
    """Coordinates [m, N padded] (float32, zero padding) on the m leading principal axes of a sample
    of the rows: orthonormal in float64, so distances between coordinates never exceed those between
    the rows (up to the rounding that :meth:`_PrunedTraversal._thresholds` allows for)."""
    n = len(x)
    rows = x[np.linspace(0, n - 1, min(n, sample)).astype(np.int64)].astype(np.float64)
    mean = rows.mean(0)
    _, vecs = np.linalg.eigh(np.cov(rows, rowvar=False))
    axes = vecs[:, ::-1][:, :m]
    out = np.zeros((m, _padded(n)), np.float32)
    for s in range(0, n, 65536):
        out[:, s:min(s + 65536, n)] = ((x[s:s + 65536] - mean) @ axes).T
    return out


def _device_step(x: torch.Tensor, sq: torch.Tensor, min_dist: torch.Tensor):
    """One greedy step on a GPU, writing the chosen index into a device slot: no host synchronisation."""
    new = torch.empty_like(min_dist)

    def step(slot: torch.Tensor) -> None:
        idx = torch.argmax(min_dist)
        slot.copy_(idx)
        c = x.index_select(0, idx.view(1))
        torch.addmv(sq, x, c[0], beta=1.0, alpha=-2.0, out=new)
        new.add_(sq.index_select(0, idx.view(1))).clamp_min_(0).sqrt_()
        torch.minimum(min_dist, new, out=min_dist)
    return step


def _replay_in_graphs(step, selected: torch.Tensor, k: int) -> int:
    """Run whole blocks of GRAPH_STEPS steps as one CUDA graph launch each (the loop is launch-bound
    otherwise); returns how many slots of ``selected`` are filled."""
    dev = selected.device
    i = 0
    block = torch.empty(GRAPH_STEPS, dtype=torch.long, device=dev)
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for _ in range(3):  # eager warm-up steps (real selections)
            step(selected[i])
            i += 1
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for j in range(GRAPH_STEPS):
            step(block[j])
    while i + GRAPH_STEPS <= k:
        graph.replay()
        selected[i:i + GRAPH_STEPS].copy_(block)
        i += GRAPH_STEPS
    return i


def covering_radius(features: torch.Tensor, selected: torch.Tensor, chunk: int = 65536) -> float:
    """max over all rows of the distance to the nearest selected row (smaller is a better coreset)."""
    c = features[selected].float()
    cc = (c * c).sum(1)
    worst = 0.0
    for s in range(0, len(features), chunk):
        a = features[s:s + chunk].float()
        d2 = (a * a).sum(1, keepdim=True) - 2 * a @ c.T + cc[None]
        worst = max(worst, float(d2.min(1).values.clamp_min(0).sqrt().max()))
    return worst


def part_size(k: int, n_part: int, n_total: int, oversample: float) -> int:
    """Centres a part keeps in the first round: its share of k, times ``oversample``."""
    return max(1, min(n_part, int(math.ceil(oversample * k * n_part / n_total))))


def select(projected: torch.Tensor, k: int, seed: int = 0, num_starting_points: int = 10,
           device: str | torch.device = "auto") -> torch.Tensor:
    """The coreset's row indices: greedy k-center, or every row when k >= N (nothing to reduce)."""
    if k >= len(projected):
        return torch.arange(len(projected))
    return greedy_coreset(projected, k, seed, num_starting_points, device)


def first_round(part: torch.Tensor, k_part: int, seed: int = 0, num_starting_points: int = 10,
                device: str | torch.device = "auto") -> tuple[np.ndarray, np.ndarray]:
    """One part of the two-round coreset: its local indices and their projected rows."""
    local = greedy_coreset(part, min(k_part, len(part)), seed, num_starting_points, device)
    return local.numpy(), part[local].cpu().numpy()


def second_round(parts: list[tuple[np.ndarray, np.ndarray, int]], k: int, seed: int = 0,
                 num_starting_points: int = 10, device: str | torch.device = "auto") -> torch.Tensor:
    """Greedy k-center over the union of the part coresets; returns the k selected global indices.

    ``parts`` holds, in order, each part's (local indices, projected rows, part size): a part's
    global offset is the total size of the parts before it.
    """
    offsets = np.cumsum([0] + [n for _, _, n in parts])
    union = torch.from_numpy(np.concatenate([local + offsets[j] for j, (local, _, _) in enumerate(parts)]))
    pool = torch.from_numpy(np.concatenate([rows for _, rows, _ in parts]))
    final = greedy_coreset(pool, min(k, len(pool)), seed, num_starting_points, device)
    return union[final]


def two_round_coreset(parts: list[torch.Tensor], k: int, seed: int = 0, oversample: float = 2.0,
                      num_starting_points: int = 10, device: str | torch.device = "auto") -> torch.Tensor:
    """Composable greedy k-center: greedy on each part, then greedy over the union of the part coresets.

    The distributed fit runs the same two functions, :func:`first_round` as one Ray task per part.
    With every part keeping k centres (oversample >= number of parts) the result is a 4-approximation
    of the optimal k-center radius (2 from each greedy round); smaller oversampling trades that bound
    for speed. Part j is seeded with ``seed + j``. Returns global indices.
    """
    n = sum(len(p) for p in parts)
    results = [first_round(p, part_size(k, len(p), n, oversample), seed + j, num_starting_points, device)
               + (len(p),) for j, p in enumerate(parts)]
    return second_round(results, k, seed, num_starting_points, device)
