"""The omni router's PyTorch path (CPU tensors without ``TRITON_INTERPRET=1``).

Three exact algorithms under the router contract (docs/router.md: NaN ranks below
-inf, scores are the float32 sums rounded to nearest even into the input dtype); their
scores are equal, and their indices too except among equal sums:

``router_pruned``
    per-axis top-k' by integer key, then the k' x k' candidate grid: O(N*k + k^2) work
    per token, but four key-sorts whose fixed costs dominate small grids.
``router_full_product``
    bitwise ``router_bruteforce``'s output (equal sums go to the lower flat index): all
    N^2 float32 sums and one ``torch.topk`` on floats for k + 1 values, then a check
    that makes it exact: equal values inside the selection are put in flat-index order,
    and rows with a tie at the k-th value or a NaN sum (which ``torch.topk`` ranks
    first) are redone by integer keys (as ``reference.router_bruteforce``).  O(N^2)
    memory per token,
    so it wins only while N^2 is small.
``router_large_k``
    the large-k algorithm of the Triton kernel (``large_k.py``; docs/router.md, "Large
    k"), vectorised over tokens: sort both axes, find the k-th largest pair key by
    bisection with per-row binary searches, emit the rows' prefixes.  O(T*(k + N))
    memory for every k up to N^2; exact on every input, +inf rows included.

``router_backward_reference`` is the backward of all three (a float32 scatter-add).

``router_cpu`` picks among them by rules measured on CPU (docs/cpu.md), the first two
only while their buffers keep the memory O(T * (N + k)) (``buffer_ok``): the full product
where ``use_full_product`` says it is the fastest, the pruned reference where
``use_pruned`` does, the large-k algorithm otherwise.
"""

from __future__ import annotations

import torch

# Up to this many sums per call (T * N^2), the pruned path's fixed cost (four integer-key
# sorts) outweighs the full product's extra work while k is small (docs/cpu.md).
FULL_PRODUCT_MAX_SUMS = 2**16
# The full product (T x N^2 sums) and the pruned reference (T x min(k, N)^2 candidates)
# run only while their buffer is at most this many times T * (N + k) elements (the
# outputs' and logits' order), or SMALL_BUFFER elements in all; otherwise the large-k
# algorithm, O(T * (N + k)).
MEMORY_FACTOR = 16
SMALL_BUFFER = 2**20

_INT32_MIN = -(2**31)


def ordered_key(v: torch.Tensor) -> torch.Tensor:
    """Map float32 values to int64 keys with the same order; NaN maps below -inf."""
    bits = v.contiguous().view(torch.int32).to(torch.int64)
    key = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return torch.where(torch.isnan(v), torch.full_like(key, _INT32_MIN), key)


def _topk_by_key(values: torch.Tensor, flat_index: torch.Tensor, k: int):
    """Top-k along the last axis by (value desc, flat_index asc); returns positions."""
    key = (ordered_key(values) << 32) + ((2**31 - 1) - flat_index.to(torch.int64))
    return key.topk(k, dim=-1, sorted=True).indices


def router_pruned(x: torch.Tensor, y: torch.Tensor, k: int):
    """Exact top-k through per-axis top-k and the k'*k' grid (k' = min(k, N))."""
    T, N = x.shape
    kk = min(k, N)
    xf, yf = x.float(), y.float()
    axis = torch.arange(N, device=x.device).expand(T, N)
    ix = _topk_by_key(xf, axis, kk)
    iy = _topk_by_key(yf, axis, kk)
    s = (xf.gather(1, ix)[:, :, None] + yf.gather(1, iy)[:, None, :]).reshape(T, kk * kk)
    flat = (ix[:, :, None] * N + iy[:, None, :]).reshape(T, kk * kk)
    pos = _topk_by_key(s, flat, k)
    scores = s.gather(1, pos).to(x.dtype)
    return scores, flat.gather(1, pos).to(torch.int32)


def router_backward_reference(grad: torch.Tensor, indices: torch.Tensor, n: int):
    """dx[t,i] = sum_r grad[t,r]*[idx div n == i], dy likewise with mod; float32 sums."""
    T = grad.shape[0]
    g = grad.float()
    idx = indices.long()
    dx = torch.zeros(T, n, dtype=torch.float32, device=grad.device)
    dy = torch.zeros(T, n, dtype=torch.float32, device=grad.device)
    dx.scatter_add_(1, idx // n, g)
    dy.scatter_add_(1, idx % n, g)
    return dx.to(grad.dtype), dy.to(grad.dtype)


def buffer_ok(T: int, width: int, N: int, k: int) -> bool:
    """Whether T buffers of ``width`` elements keep the memory O(T * (N + k))."""
    return T * width <= max(MEMORY_FACTOR * T * (N + k), SMALL_BUFFER)


def use_full_product(T: int, N: int, k: int, dtype: torch.dtype = torch.float32) -> bool:
    """True when ``router_full_product`` is the faster exact CPU algorithm (measured,
    docs/cpu.md) and its T x N^2 buffer stays within ``buffer_ok``.  float32 logits
    only: bf16 sums tie often (measured; fp16 is treated alike, unmeasured), and ties
    send rows to the slow exact fix-up.  Then: when the pruned candidate grid k'^2
    (k' = min(k, N)) is at least half of N^2, pruning saves little; and at small calls
    with small k the pruned path's fixed cost dominates."""
    if dtype != torch.float32 or not buffer_ok(T, N * N, N, k):
        return False
    kk = min(k, N)
    return 2 * kk * kk >= N * N or (T * N * N <= FULL_PRODUCT_MAX_SUMS and k <= 8)


def use_pruned(T: int, N: int, k: int) -> bool:
    """True when the pruned reference (T x min(k, N)^2 candidates) is within
    ``buffer_ok`` and faster than the large-k algorithm, by a cost model fitted to CPU
    measurements (docs/cpu.md): the pruned reference about 0.025 us per candidate up to
    2^20 candidates a call and 0.05 us beyond (the buffer leaves the cache), the large-k
    algorithm about 6 ms a call plus 0.6 us per token and (N + k)."""
    kk = min(k, N)
    cand = T * kk * kk
    pruned_us = cand * (0.025 if cand <= 2**20 else 0.05)
    return buffer_ok(T, kk * kk, N, k) and pruned_us <= 6000 + 0.6 * T * (N + k)


def router_full_product(x: torch.Tensor, y: torch.Tensor, k: int):
    """Exact top-k of all N^2 sums through a float ``torch.topk``; the same output as
    ``reference.router_bruteforce``.  Memory O(T*N^2)."""
    T, N = x.shape
    if k == 0 or T == 0:
        return x.new_empty((T, k)), torch.empty((T, k), dtype=torch.int32, device=x.device)
    s = (x.float()[:, :, None] + y.float()[:, None, :]).reshape(T, N * N)
    # One value past the k-th: if it is smaller, no unselected sum ties the k-th value.
    kk = min(k + 1, N * N)
    vals, pos = s.topk(kk, dim=-1, sorted=True)
    # torch.topk ranks NaN above +inf (the contract: below -inf), so a row with a NaN sum
    # has one first; equal values come in no promised order.  One check covers both.
    tie = vals[:, 1:] == vals[:, :-1]
    nan = torch.isnan(vals[:, 0])
    if not bool(tie.any() | nan.any()):
        # Contiguous like the kernels' outputs (and the op's fake): a float32 ``.to`` of
        # the (T, k + 1) slice would be a strided view, which compiled graphs reject.
        return vals[:, :k].to(x.dtype).contiguous(), pos[:, :k].to(torch.int32)
    vals, pos = vals[:, :k], pos[:, :k]
    # Ties inside the selection: order them by flat index (key order, as brute force).
    key = (ordered_key(vals) << 32) + ((2**31 - 1) - pos)
    order = key.argsort(dim=1, descending=True)
    scores = vals.gather(1, order).to(x.dtype)
    indices = pos.gather(1, order).to(torch.int32)
    # A tie at the k-th value (the choice among equal sums outside the selection) or a NaN:
    # those rows by integer keys.
    redo = nan
    if kk > k:
        redo = redo | tie[:, k - 1]
    if bool(redo.any()):
        rows = redo.nonzero().squeeze(1)
        sr = s[rows]
        p = _topk_by_key(sr, torch.arange(N * N, device=x.device).expand(rows.numel(), N * N), k)
        scores[rows] = sr.gather(1, p).to(x.dtype)
        indices[rows] = p.to(torch.int32)
    return scores, indices


# ---------------------------------------------------------------------------------------
# The large-k algorithm (the Triton kernel's, docs/router.md "Large k"), vectorised.
# ---------------------------------------------------------------------------------------


def _sorted_axis(v: torch.Tensor):
    """Each row of float32 ``v`` sorted descending by key, equal keys by column ascending
    (a stable sort): (values, columns int64)."""
    key = ordered_key(v)
    _, order = torch.sort(key, dim=1, descending=True, stable=True)
    return v.gather(1, order), order


def _row_counts(xs, ys, start, t, a, b):
    """Per row: the number of leading entries of its sum sequence with key >= t.

    Row i of token r has the sums xs[r, i] + ys[r, (start[r, i] + c) mod N], c = 0..N-1,
    whose keys do not increase with c; the count is known to lie in [a, b].  A binary
    search over the rows whose bracket is open (compacted each step)."""
    N = xs.shape[1]
    a, b = a.clone(), b.clone()
    while True:
        act = (a < b).nonzero(as_tuple=True)
        if act[0].numel() == 0:
            return a
        aa, bb = a[act], b[act]
        m = (aa + bb + 1) >> 1
        s = xs[act] + ys[act[0], _wrap(start[act] + m - 1, N)]
        ok = ordered_key(s) >= t[act[0]]
        a[act] = torch.where(ok, m, aa)
        b[act] = torch.where(ok, bb, m - 1)


def _wrap(j, N):
    return torch.where(j >= N, j - N, j)


def _sum_keys(xs, ys, start, c):
    """Keys of the entries at positions c (clamped into [0, N)) of every row."""
    N = xs.shape[1]
    c = c.clamp(0, N - 1)
    return ordered_key(xs + ys.gather(1, _wrap(start + c, N)))


def router_large_k(x: torch.Tensor, y: torch.Tensor, k: int, sorted: bool = True):
    """Exact top-k of x[t, i] + y[t, j] in O(T * (N + k)) memory, any k <= N^2.

    Output order: ``sorted`` -- score descending, equal scores by flat index ascending;
    otherwise grouped by x rank (x logits by key descending, equal ones by column), each
    group in descending score order (equal scores by y key and column).  Bitwise the
    Triton large-k kernel's output in both orders.
    """
    T, N = x.shape
    dev = x.device
    if T == 0 or k == 0:
        return x.new_empty((T, k)), torch.empty((T, k), dtype=torch.int32, device=dev)
    xs, cx = _sorted_axis(x.float())
    ys, cy = _sorted_axis(y.float())
    # Row i's sums follow the sorted y from rank start[i]: 0, except for x = -inf when y
    # holds +inf: -inf + +inf is NaN, so such a row starts after the +inf entries (and
    # wraps around to them last), which keeps its keys non-increasing.
    inf = float("inf")
    p_inf = (ys == inf).sum(1, keepdim=True)
    start = torch.where((xs == -inf) & (p_inf < N), p_inf, torch.zeros_like(p_inf))
    # Search on the key t: C(lo) = c_lo >= k > C(hi) = c_hi, C(t) = #pairs with key >= t;
    # per row, ch = its count at lo and cl at hi.
    hi = _sum_keys(xs, ys, start, torch.zeros_like(start)).max(1).values + 1
    lo = torch.full((T,), _INT32_MIN, dtype=torch.int64, device=dev)
    c_lo = torch.full((T,), N * N, dtype=torch.int64, device=dev)
    c_hi = torch.zeros((T,), dtype=torch.int64, device=dev)
    cl = torch.zeros((T, N), dtype=torch.int64, device=dev)
    ch = torch.full((T, N), N, dtype=torch.int64, device=dev)
    # First probe: the best rectangle bound, max over a of key(xs[a] + ys[b_a]) with
    # (a + 1)(b_a + 1) >= k (exact when rows are monotone; any probe is valid anyway).
    a = torch.arange(N, device=dev)
    b = (k + a) // (a + 1) - 1
    keep = b < N
    probe = ordered_key((xs[:, keep] + ys[:, b[keep]]).contiguous()).max(1).values
    probe = torch.where(probe > lo, probe, lo + (hi - lo) // 2)
    interp = torch.ones((T,), dtype=torch.bool, device=dev)
    while True:
        act = ((hi - lo > 1) & (c_lo != k)).nonzero().squeeze(1)
        if act.numel() == 0:
            break
        t = probe[act]
        x_, y_, st = xs[act], ys[act], start[act]
        cnt = _row_counts(x_, y_, st, t, cl[act], ch[act])
        c = cnt.sum(1)
        up = c >= k
        # Snap to the data: the smallest pair key >= t (same count) when raising lo, the
        # largest key < t, plus one, when lowering hi.
        big = torch.full_like(cnt, 2**31)
        above = torch.where(cnt > 0, _sum_keys(x_, y_, st, cnt - 1), big).min(1).values
        below = torch.where(cnt < N, _sum_keys(x_, y_, st, cnt), -big).max(1).values + 1
        lo_a, hi_a = lo[act], hi[act]
        new_lo = torch.where(up, above, lo_a)
        new_hi = torch.where(up, hi_a, below)
        lo[act], hi[act] = new_lo, new_hi
        c_lo[act] = torch.where(up, c, c_lo[act])
        c_hi[act] = torch.where(up, c_hi[act], c)
        ch[act] = torch.where(up[:, None], cnt, ch[act])
        cl[act] = torch.where(up[:, None], cl[act], cnt)
        # Next probe: interpolated after a bisection or after an interpolation that
        # halved the range, else a bisection (at most two probes per halving).
        interp[act] = ~interp[act] | (2 * (new_hi - new_lo) <= hi_a - lo_a)
        probe[act] = _next_probe(new_lo, new_hi, c_lo[act], c_hi[act], k, interp[act])
    # Exactly k pairs at or above lo: take them all; else tau = lo and rows take the
    # pairs above tau (cl) plus ties at tau in row order until k.
    cl = torch.where((c_lo == k)[:, None], ch, cl)
    ties = ch - cl
    need = k - cl.sum(1, keepdim=True)
    take = (need - (ties.cumsum(1) - ties)).clamp(min=0).minimum(ties)
    n = cl + take
    incl = n.cumsum(1)
    q = torch.arange(k, device=dev).expand(T, k).contiguous()
    row = torch.searchsorted(incl, q, right=True)
    r = q - (incl - n).gather(1, row)
    j = _wrap(start.gather(1, row) + r, N)
    s = xs.gather(1, row) + ys.gather(1, j)
    flat = cx.gather(1, row) * N + cy.gather(1, j)
    if sorted:
        key = (ordered_key(s) << 32) | ((2**31 - 1) - flat)
        order = key.argsort(dim=1, descending=True)
        s, flat = s.gather(1, order), flat.gather(1, order)
    return s.to(x.dtype), flat.to(torch.int32)


def _next_probe(lo, hi, c_lo, c_hi, k, interp):
    """A key strictly inside (lo, hi): where the line through (lo, c_lo), (hi, c_hi)
    reaches k + 1/2, or the middle."""
    mid = lo + (hi - lo) // 2
    frac = (c_lo - k - 0.5) / (c_lo - c_hi).clamp(min=1)
    t = lo + ((hi - lo).double() * frac).long()
    t = torch.minimum(torch.maximum(t, lo + 1), hi - 1)
    return torch.where(interp, t, mid)


def router_cpu(x: torch.Tensor, y: torch.Tensor, k: int, sorted: bool = True):
    """The CPU path: the faster exact algorithm for this size within O(T * (N + k))
    memory.  ``sorted=False`` returns the same pairs in the algorithm's own order (the
    pruned reference and the full product sort anyway)."""
    T, N = x.shape
    # The full product and the large-k algorithm read their data (host syncs); meta
    # tensors have none, and only their shapes matter.
    if x.device.type == "meta":
        return x.new_empty((T, k)), x.new_empty((T, k), dtype=torch.int32)
    if use_full_product(T, N, k, x.dtype):
        return router_full_product(x, y, k)
    if use_pruned(T, N, k):
        return router_pruned(x, y, k)
    return router_large_k(x, y, k, sorted)
