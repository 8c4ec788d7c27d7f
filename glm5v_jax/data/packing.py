"""Joint bin-packing over text tokens and ViT tokens, and balancing packed rows across data-parallel ranks.

    rows, skipped = pack_rows(text, vit, seq_len=4096, vit_capacity=16384)    # row -> item indices
    ranks = balance_ranks(row_loads(rows, text, vit), num_ranks=8)             # rank -> row indices

A multimodal sample costs the backbone its text length and the vision tower its ViT tokens (patches);
a row holds at most `seq_len` of the first and `vit_capacity` of the second. Packing on text length alone
(what verl and slime balance) lets one row carry a dozen images while its neighbour carries none, and the
ViT step of the rank that drew it sets everyone's step time. Here:

  * `pack_rows`: first-fit decreasing, items ordered by their larger share of either capacity, each placed
    in the first row where both fit. Every item is placed exactly once or reported as skipped (larger than
    a row in one dimension); no row exceeds either capacity.
  * `balance_ranks`: rows dealt to ranks so that every rank gets the same number of rows (its micro-batch
    count; empty rows pad the last ones) and the ranks' loads are even in both dimensions: the balanced
    Karmarkar-Karp differencing method, generalised to two-dimensional loads (each dimension normalised by
    its mean row load; partial partitions merged largest spread first, the heaviest subset of one with the
    lightest of the other).

Pure NumPy and Python, on sizes only: the data pipeline and the RL batch builder call it with their
samples' sizes and then lay the tokens out themselves.
"""
from __future__ import annotations

import heapq
import itertools
from typing import Sequence

import numpy as np


def pack_rows(text: Sequence[int], vit: Sequence[int], *, seq_len: int,
              vit_capacity: int) -> tuple[list[list[int]], list[int]]:
    """(rows: lists of item indices, skipped: indices of items too large for a row).

    text[i], vit[i]: item i's text tokens and ViT tokens. First-fit decreasing on max(text/seq_len,
    vit/vit_capacity); within a row the indices are in input order."""
    text, vit = np.asarray(text, np.int64), np.asarray(vit, np.int64)
    if text.shape != vit.shape or text.ndim != 1:
        raise ValueError(f"pack_rows: text {text.shape} and vit {vit.shape} must be 1-D of one length")
    if seq_len < 1 or vit_capacity < 0:
        raise ValueError(f"pack_rows: seq_len ({seq_len}) must be >= 1 and vit_capacity ({vit_capacity}) >= 0")
    share = np.maximum(text / seq_len, vit / max(vit_capacity, 1))
    order = sorted(range(len(text)), key=lambda i: (-share[i], i))
    rows: list[list[int]] = []
    room_text: list[int] = []
    room_vit: list[int] = []
    skipped = []
    for i in order:
        t, v = int(text[i]), int(vit[i])
        if t > seq_len or v > vit_capacity:
            skipped.append(i)
            continue
        row = next((r for r in range(len(rows)) if t <= room_text[r] and v <= room_vit[r]), None)
        if row is None:
            rows.append([])
            room_text.append(seq_len)
            room_vit.append(vit_capacity)
            row = len(rows) - 1
        rows[row].append(i)
        room_text[row] -= t
        room_vit[row] -= v
    return [sorted(r) for r in rows], sorted(skipped)


def row_loads(rows: Sequence[Sequence[int]], text: Sequence[int], vit: Sequence[int]) -> np.ndarray:
    """`[rows, 2]` (text tokens, ViT tokens) of each row."""
    text, vit = np.asarray(text, np.int64), np.asarray(vit, np.int64)
    return np.array([[text[list(r)].sum(), vit[list(r)].sum()] for r in rows], np.int64).reshape(-1, 2)


def balance_ranks(loads: np.ndarray, num_ranks: int) -> list[list[int]]:
    """rank -> indices of its rows; every rank gets ceil(rows / num_ranks) rows (indices >= len(loads) are
    empty padding rows) and the ranks' summed loads are balanced in every dimension of `loads [rows, d]`."""
    loads = np.asarray(loads, np.float64).reshape(len(loads), -1)
    if num_ranks < 1:
        raise ValueError(f"balance_ranks: num_ranks must be >= 1, got {num_ranks}")
    per_rank = -(-len(loads) // num_ranks)
    n = per_rank * num_ranks
    padded = np.zeros((n, loads.shape[1]))
    padded[:len(loads)] = loads
    scale = padded.mean(0)
    norm = padded / np.where(scale > 0, scale, 1.0)  # each dimension in units of its mean row load
    weight = norm.sum(1)
    order = sorted(range(n), key=lambda i: (-weight[i], i))
    # a partial solution: num_ranks subsets (row lists, summed normalised loads), subsets sorted heaviest first
    heap: list[tuple[float, int, list[tuple[list[int], np.ndarray]]]] = []
    counter = itertools.count()
    for start in range(0, n, num_ranks):
        subsets = [([i], norm[i].copy()) for i in order[start:start + num_ranks]]
        heapq.heappush(heap, (-_spread(subsets), next(counter), subsets))
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        a = sorted(a, key=lambda s: -s[1].sum())
        b = sorted(b, key=lambda s: s[1].sum())  # heaviest of one with the lightest of the other
        merged = sorted(((ra + rb, la + lb) for (ra, la), (rb, lb) in zip(a, b)), key=lambda s: -s[1].sum())
        heapq.heappush(heap, (-_spread(merged), next(counter), merged))
    (_, _, final), = heap
    return sorted((sorted(rows) for rows, _ in final), key=lambda r: r[0])


def rank_order(loads: np.ndarray, num_ranks: int) -> list[int]:
    """The rows of `loads [rows, d]` in the order the ranks take them (`balance_ranks`): rank 0's rows, then
    rank 1's, ..., so that each rank's share is a contiguous slice; indices >= len(loads) are empty padding."""
    return [i for rows in balance_ranks(loads, num_ranks) for i in rows]


def _spread(subsets) -> float:
    """The largest max-min difference of the subsets' loads over the dimensions."""
    loads = np.stack([load for _, load in subsets])
    return float((loads.max(0) - loads.min(0)).max())


def imbalance(groups: Sequence[Sequence[int]], loads: np.ndarray) -> np.ndarray:
    """Per dimension, max over groups of the group's summed load / the mean group load (1.0 = even).
    Indices past `loads` (padding rows) count as empty."""
    loads = np.asarray(loads, np.float64).reshape(len(loads), -1)
    sums = np.array([loads[[i for i in g if i < len(loads)]].sum(0) for g in groups])
    mean = sums.mean(0)
    return np.where(mean > 0, sums.max(0) / np.where(mean > 0, mean, 1.0), 1.0)
