"""Router kernels on every special bit pattern: NaN of both signs (quiet and signalling),
±inf, ±0, the smallest and largest subnormals, the largest finite values.

Inputs are built from raw words (int16/int32 viewed as the float dtype), not from float
conversions: ``float('nan')`` converted to bfloat16 only ever gives one NaN pattern, and
the interpreter keeps bfloat16 as raw words, so a NaN with the sign bit clear or a
subnormal is exactly what a float compare or a float conversion would get wrong.  The
oracle decodes the words itself and works in float64 (Python floats), independently of
the package's references (``omni_moe.ops.router.reference``) and of torch's conversions:
a float32 sum rounded from float64 is the correctly rounded float32 sum
(53 >= 2 * 24 + 2 bits), then rounded to the input dtype.
"""

from __future__ import annotations

import math
import random
import struct

import numpy as np
import pytest
import torch

from omni_moe.ops.router.fullscan import FullscanConfig, fullscan_router_forward
from omni_moe.ops.router.pruned import pruned_router_forward
from omni_moe.ops.router.backward import FixedBackwardConfig, router_backward
from router_checks import pruned_config

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# (bits, exponent bits, mantissa bits, signed integer dtype of the same width)
FORMAT = {F32: (32, 8, 23, torch.int32), F16: (16, 5, 10, torch.int16),
          BF16: (16, 8, 7, torch.int16)}


def _specials(dtype):
    """Named words: +qNaN, -qNaN, +sNaN, -sNaN, ±inf, ±0, ±smallest and ±largest
    subnormal, ±smallest normal, ±largest finite."""
    bits, e, m, _ = FORMAT[dtype]
    sign = 1 << (bits - 1)
    inf = ((1 << e) - 1) << m
    pos = {"qnan": inf | (1 << (m - 1)), "snan": inf | 1, "inf": inf, "zero": 0,
           "sub_min": 1, "sub_max": (1 << m) - 1, "norm_min": 1 << m, "max": inf - 1}
    out = {}
    for name, w in pos.items():
        out["+" + name] = w
        out["-" + name] = w | sign
    return out


def _decode(word, dtype):
    """float64 value of a word (NaN for every NaN pattern)."""
    bits, e, m, _ = FORMAT[dtype]
    word &= (1 << bits) - 1
    s = -1.0 if word >> (bits - 1) else 1.0
    ex = (word >> m) & ((1 << e) - 1)
    man = word & ((1 << m) - 1)
    bias = (1 << (e - 1)) - 1
    if ex == (1 << e) - 1:
        return s * math.inf if man == 0 else math.nan
    if ex == 0:
        return s * math.ldexp(man, 1 - bias - m)
    return s * math.ldexp(man | (1 << m), ex - bias - m)


def _f32_bits(v):
    return struct.unpack("<I", struct.pack("<f", v))[0]


def _round(v, dtype):
    """The contract's score of a float64 sum v: round to float32 (RNE; overflow to inf),
    then to ``dtype`` (RNE), as a float64 value."""
    with np.errstate(over="ignore", invalid="ignore"):
        f = float(np.float32(v))
    if dtype == F32 or math.isnan(f) or math.isinf(f):
        return f
    if dtype == F16:
        with np.errstate(over="ignore"):
            return float(np.float16(f))
    b = _f32_bits(f)
    b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16  # RNE to the upper 16 bits
    return _decode(b, BF16)


def _tensor(words, dtype):
    bits, _, _, itype = FORMAT[dtype]
    arr = np.array(words, dtype=np.int64)
    arr = np.where(arr >= 1 << (bits - 1), arr - (1 << bits), arr)
    return torch.tensor(arr, dtype=torch.int64).to(itype).view(dtype)


def _words(t):
    dtype = t.dtype
    return t.view(FORMAT[dtype][3]).to(torch.int64).tolist()


def _same_value(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == b


def _make_rows(dtype, T, N, seed):
    """(x words, y words) [T][N]: specials mixed with ordinary values, plus fixed rows."""
    sp = _specials(dtype)
    rng = random.Random(seed)
    ordinary = [_words(torch.tensor([v]).to(dtype))[0]
                for v in (1.0, -1.0, 2.0, -3.0, 0.5, 4.0, -0.25, 3.0)]
    special = list(sp.values())
    small = [sp[n] for n in ("+sub_min", "-sub_min", "+sub_max", "-sub_max", "+zero",
                             "-zero", "+norm_min", "-norm_min")]
    one = ordinary[0]
    sign = 1 << (FORMAT[dtype][0] - 1)
    subnormal = [w | (sign if j % 3 == 1 else 0)
                 for j, w in enumerate(rng.sample(range(1, sp["+norm_min"]), N))]
    up = [_words(torch.tensor([float(v)]).to(dtype))[0] for v in range(N)]
    fixed = [
        # a NaN with the sign bit clear among ordinary values ranks last, not first
        ([sp["+qnan"]] + up[1:], up),
        ([sp["-qnan"]] + up[1:], [sp["+snan"]] + up[1:]),
        ([sp["+qnan"]] * N, [sp["-snan"]] * N),  # all NaN
        (up, [sp["-snan"]] * (N - 1) + [one]),  # one non-NaN pair per x entry
        ([rng.choice(small) for _ in range(N)], [rng.choice(small) for _ in range(N)]),
        (subnormal, subnormal[::-1]),  # every sum subnormal (or the smallest normals)
        ([sp["+zero"], sp["-zero"]] * (N // 2) + [sp["-zero"]] * (N % 2),
         [sp["-zero"]] * N),
        ([sp["-inf"]] * N, [sp["+max"]] * N),  # fully masked
        ([sp["+max"]] * N, [sp["+max"], sp["-max"]] * (N // 2) + [one] * (N % 2)),  # overflow
        ([sp["+inf"]] + up[1:], [sp["-inf"]] + up[1:]),  # +inf row
    ]
    xs, ys = [], []
    for t in range(T):
        if t < len(fixed):
            xw, yw = fixed[t]
        else:
            # every third row without +inf among specials, every third with it
            pool = (small + ordinary, [w for w in special if w != sp["+inf"]], special)[t % 3]
            xw = [rng.choice(pool) if rng.random() < 0.6 else rng.choice(ordinary) for _ in range(N)]
            yw = [rng.choice(pool) if rng.random() < 0.6 else rng.choice(ordinary) for _ in range(N)]
        xs.append(list(xw))
        ys.append(list(yw))
    return xs, ys


def _rank_key(v):
    # The contract's total order, as a sort key: NaN below everything.
    return (0, 0.0) if math.isnan(v) else (1, v)


def _check_forward(xw, yw, dtype, k, scores, indices, exact_with_pinf):
    T, N = len(xw), len(xw[0])
    s_words = _words(scores)
    idx = indices.tolist()
    for t in range(T):
        xv = [_decode(w, dtype) for w in xw[t]]
        yv = [_decode(w, dtype) for w in yw[t]]
        sums = [_round(a + b, dtype) for a in xv for b in yv]
        got = [_decode(w, dtype) for w in s_words[t]]
        row = idx[t]
        assert all(0 <= e < N * N for e in row), f"row {t}: index out of range {row}"
        assert len(set(row)) == k, f"row {t}: duplicate index {row}"
        for r, e in enumerate(row):
            want = sums[e]
            if math.isnan(want):
                assert math.isnan(got[r]), f"row {t}, slot {r}: score {got[r]} for a NaN sum"
            else:
                # bitwise, so the sign of a zero must match its pair too
                assert s_words[t][r] == _words(torch.tensor([want], dtype=torch.float64).to(dtype))[0], \
                    f"row {t}, slot {r}: score {got[r]!r} does not match index {e} ({want!r})"
        if not exact_with_pinf and any(v == math.inf for v in xv + yv):
            continue  # the contract promises only validity for rows with +inf
        ref = sorted(sums, key=_rank_key, reverse=True)[:k]
        for r in range(k):
            assert _same_value(got[r], ref[r]), \
                f"row {t}, slot {r}: score {got[r]!r}, oracle {ref[r]!r} (row {got}, oracle {ref})"


# Each forward path of both routers, forced at sizes the interpreter runs quickly.
PATHS = {
    "fullscan-small": lambda x, y, k: fullscan_router_forward(x, y, k),
    "fullscan-chunk-merge": lambda x, y, k: fullscan_router_forward(
        x, y, k, config=FullscanConfig(split=True, chunk=64, merge_block=16)),
    "pruned-stream": lambda x, y, k: pruned_router_forward(
        x, y, k, config=pruned_config(x.shape[0], x.shape[1], k, {"kernel": "stream"})),
    "pruned-warp": lambda x, y, k: pruned_router_forward(
        x, y, k, config=pruned_config(x.shape[0], x.shape[1], k, {"kernel": "warp", "grid": 1})),
    "pruned-warp-grid0": lambda x, y, k: pruned_router_forward(
        x, y, k, config=pruned_config(x.shape[0], x.shape[1], k, {"kernel": "warp", "grid": 0})),
    "large-k": lambda x, y, k: pruned_router_forward(
        x, y, k, config=pruned_config(x.shape[0], x.shape[1], k, {"kernel": "large_k"})),
}
# Exact also on rows with +inf (the contract asks only validity there).
EXACT_WITH_PINF = ("fullscan-small", "fullscan-chunk-merge", "large-k")


@pytest.mark.parametrize("dtype", [BF16, F16, F32], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("path", list(PATHS))
def test_router_special_values(path, dtype, device):
    N, k = (20, 7) if path != "pruned-stream" else (16, 5)
    xw, yw = _make_rows(dtype, 16, N, seed=N + k)
    x = _tensor(xw, dtype).to(device)
    y = _tensor(yw, dtype).to(device)
    s, i = PATHS[path](x, y, k)
    _check_forward(xw, yw, dtype, k, s.cpu(), i.cpu(), exact_with_pinf=path in EXACT_WITH_PINF)


@pytest.mark.parametrize("dtype", [BF16, F16, F32], ids=lambda d: str(d)[6:])
def test_router_special_values_large_k(dtype, device):
    """The large-k kernel (sorted and unsorted) and its PyTorch twin past k = N, exact on
    every row, +inf rows included."""
    from omni_moe.ops.router.cpu import router_large_k
    from omni_moe.ops.router.large_k import large_k_router_forward

    N = 20
    xw, yw = _make_rows(dtype, 16, N, seed=5)
    x = _tensor(xw, dtype).to(device)
    y = _tensor(yw, dtype).to(device)
    for k in (N + 1, N * N - 3):
        for sorted_ in (True, False):
            s, i = large_k_router_forward(x, y, k, sorted=sorted_)
            ts, ti = router_large_k(x.cpu(), y.cpu(), k, sorted_)
            assert torch.equal(i.cpu(), ti)
            if sorted_:
                _check_forward(xw, yw, dtype, k, s.cpu(), i.cpu(), exact_with_pinf=True)
            else:
                # the unsorted call returns the sorted call's pairs
                assert torch.equal(i.cpu().sort(1).values, large_k_router_forward(x, y, k)[1].cpu().sort(1).values)


@pytest.mark.parametrize("dtype", [BF16, F16, F32], ids=lambda d: str(d)[6:])
def test_router_special_values_threshold_stage(dtype, device):
    """The warp kernel's threshold per-axis stage (bisection in key space) on specials."""
    N, k = 64, 5
    xw, yw = _make_rows(dtype, 12, N, seed=3)
    x = _tensor(xw, dtype).to(device)
    y = _tensor(yw, dtype).to(device)
    s, i = pruned_router_forward(x, y, k, config=pruned_config(12, N, k, {"kernel": "warp", "thresh": True}))
    _check_forward(xw, yw, dtype, k, s.cpu(), i.cpu(), exact_with_pinf=False)


def test_public_router_positive_nan_bf16(device):
    """The public function on a bfloat16 NaN with the sign bit clear (what
    ``torch.tensor([nan], dtype=torch.bfloat16)`` holds)."""
    from omni_moe import omni_router

    x = torch.tensor([[float("nan"), 1, 2, 3, 4]], dtype=BF16, device=device)
    assert _words(x.cpu())[0][0] == 0x7FC0
    y = torch.tensor([[0.0, 1, 2, 3, 4]], dtype=BF16, device=device)
    s, i = omni_router(x, y, 5, 3)
    assert s.float().cpu().tolist() == [[8.0, 7.0, 7.0]]
    assert sorted(i.cpu().tolist()[0][1:]) == [19, 23] and i[0, 0].item() == 24


def _grad_rows(dtype, T, k, seed):
    """Upstream gradient words: each row draws from one family whose float32 sums are
    exact in any order (specials with subnormals, or specials with small integers)."""
    sp = _specials(dtype)
    rng = random.Random(seed)
    nonfinite = [sp[n] for n in ("+qnan", "-qnan", "+snan", "-snan", "+inf", "-inf")]
    subs = [sp[n] for n in ("+sub_min", "-sub_min", "+sub_max", "-sub_max", "+zero", "-zero")]
    ints = [_words(torch.tensor([float(v)]).to(dtype))[0] for v in (1, -2, 3, 0.5, -0.0, 0.0)]
    rows = []
    for t in range(T):
        fam = subs if t % 2 == 0 else ints
        p_nonfinite = 0.0 if t < 2 else 0.3
        rows.append([rng.choice(nonfinite) if rng.random() < p_nonfinite else rng.choice(fam)
                     for _ in range(k)])
    return rows


@pytest.mark.parametrize("cfg", [None, FixedBackwardConfig(block=4, tile_t=2)], ids=["rule", "fixed"])
@pytest.mark.parametrize("dtype", [BF16, F16, F32], ids=lambda d: str(d)[6:])
def test_router_backward_special_gradients(dtype, cfg, device):
    """dx[t, i] = sum of g[t, r] over idx[t, r] div N = i (dy: mod N), against a float64
    scatter of the decoded words, rounded like the kernel's float32 accumulation."""
    T, N, k = 9, 6, 12
    rng = random.Random(7)
    # Distinct indices per row; k > N, so rows and columns repeat within a row.
    idx = [rng.sample(range(N * N), k) for _ in range(T)]
    gw = _grad_rows(dtype, T, k, seed=11)
    g = _tensor(gw, dtype).to(device)
    indices = torch.tensor(idx, dtype=torch.int32, device=device)
    dx = torch.full((T, N), float("nan"), dtype=dtype, device=device)
    dy = torch.full((T, N), float("nan"), dtype=dtype, device=device)
    router_backward(g, indices, N, dx, dy, config=cfg)
    dxw, dyw = _words(dx.cpu()), _words(dy.cpu())
    for t in range(T):
        ax, ay = [0.0] * N, [0.0] * N
        for e, w in zip(idx[t], gw[t]):
            v = _decode(w, dtype)
            ax[e // N] += v
            ay[e % N] += v
        for name, acc, out in (("dx", ax, dxw), ("dy", ay, dyw)):
            for j in range(N):
                want = _round(acc[j], dtype)
                got = _decode(out[t][j], dtype)
                assert _same_value(got, want), f"{name}[{t}, {j}] = {got!r}, oracle {want!r}"
