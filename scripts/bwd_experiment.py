"""Router-backward experiment (not library code): where does the backward's time go?

Times, kernel only (do_bench median and CUDA-graph replay per call), on fresh router
indices: the library's sparse kernel (k <= 64), its dense kernel, and an experimental
3-D variant that loads each token's k (index, gradient) pairs once as a 2-D tile and
reduces a [TILE_T, KP, BLOCK_N] compare tensor with tl.sum (deterministic, but its
summation order is a tree, not the reference's sequential one).  Checks each against
router_backward_reference (exact for the library kernels, max-abs for the variant).
"""
import json
import os
import sys

import torch
import triton
import triton.language as tl

from omni_moe.reference import router_backward_reference
from omni_moe.triton import router_backward as rb
from omni_moe.triton.omni_router_optimized import pruned_router_forward


@triton.jit
def _bwd_tile3d(G, IDX, DX, DY, T, K, stride_gt, stride_it,
                N: tl.constexpr, TILE_T: tl.constexpr, KP: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * TILE_T + tl.arange(0, TILE_T)
    row_ok = rows < T
    rows64 = rows.to(tl.int64)
    r = tl.arange(0, KP)
    m2 = row_ok[:, None] & (r[None, :] < K)
    e = tl.load(IDX + rows64[:, None] * stride_it + r[None, :], mask=m2, other=-1)
    g = tl.load(G + rows64[:, None] * stride_gt + r[None, :], mask=m2, other=0.0).to(tl.float32)
    ex = tl.where(e >= 0, e // N, -1)
    ey = tl.where(e >= 0, e - (e // N) * N, -1)
    cols = tl.arange(0, BLOCK_N)[None, None, :]
    g3 = g[:, :, None]
    dx = tl.sum(tl.where(ex[:, :, None] == cols, g3, 0.0), axis=1)
    dy = tl.sum(tl.where(ey[:, :, None] == cols, g3, 0.0), axis=1)
    c2 = tl.arange(0, BLOCK_N)[None, :]
    mask = row_ok[:, None] & (c2 < N)
    tl.store(DX + rows64[:, None] * N + c2, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DY + rows64[:, None] * N + c2, dy.to(DY.dtype.element_ty), mask=mask)


def tile3d(g, idx, n, tile_t):
    T, K = idx.shape
    dx = torch.empty((T, n), dtype=g.dtype, device=g.device)
    dy = torch.empty_like(dx)
    kp = triton.next_power_of_2(K)
    _bwd_tile3d[(triton.cdiv(T, tile_t),)](g, idx, dx, dy, T, K, g.stride(0), idx.stride(0),
                                            N=n, TILE_T=tile_t, KP=kp, BLOCK_N=triton.next_power_of_2(n),
                                            num_warps=4)
    return dx, dy


def dense(g, idx, n):
    T, K = idx.shape
    dx = torch.empty((T, n), dtype=g.dtype, device=g.device)
    dy = torch.empty_like(dx)
    tile_t, block_n, warps = rb._config(T, n)
    rb._router_bwd_kernel[(triton.cdiv(T, tile_t), triton.cdiv(n, block_n))](
        g, idx, dx, dy, T, n, K, g.stride(0), g.stride(1), idx.stride(0), idx.stride(1),
        dx.stride(0), dy.stride(0), TILE_T=tile_t, BLOCK_N=block_n, num_warps=warps)
    return dx, dy


def graph_us(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        for _ in range(reps):
            fn()
    return triton.testing.do_bench(lambda: gr.replay(), return_mode="median") * 1e3 / reps


def main(out):
    rows = []
    for T, N, k in [(1024, 64, 16), (1024, 256, 32), (16384, 256, 16), (65536, 256, 16), (4096, 1024, 16)]:
        x = torch.randn(T, N, device="cuda", dtype=torch.bfloat16)
        y = torch.randn(T, N, device="cuda", dtype=torch.bfloat16)
        _, idx = pruned_router_forward(x, y, k)
        g = torch.randn(T, k, device="cuda").to(torch.bfloat16)
        rdx, rdy = router_backward_reference(g.cpu(), idx.cpu(), N)
        floor = (T * k * 6 + 2 * T * N * 2) / 3.0e12 * 1e6
        variants = {"library": lambda: rb.router_backward(g, idx, N), "dense": lambda: dense(g, idx, N)}
        for tt in (1, 2, 4, 8):
            if tt * triton.next_power_of_2(k) * triton.next_power_of_2(N) <= 65536:
                variants[f"tile3d_t{tt}"] = (lambda tt=tt: tile3d(g, idx, N, tt))
        for name, fn in variants.items():
            try:
                dx, dy = fn()
                err = max((dx.cpu().float() - rdx.float()).abs().max().item(),
                          (dy.cpu().float() - rdy.float()).abs().max().item())
                exact = torch.equal(dx.cpu(), rdx) and torch.equal(dy.cpu(), rdy)
                t = triton.testing.do_bench(fn, return_mode="median") * 1e3
                tg = graph_us(fn)
                row = dict(T=T, N=N, k=k, variant=name, us=t, graph_us=tg, floor_us=floor, maxerr=err, exact=exact)
            except Exception as exc:  # report and go on
                row = dict(T=T, N=N, k=k, variant=name, error=repr(exc)[:200])
            rows.append(row)
            print(row, flush=True)
    json.dump(rows, open(os.path.join(out, "bwd_experiment.json"), "w"), indent=1)
    print(f"{'T':>6} {'N':>5} {'k':>3} {'variant':>12} {'do_bench':>9} {'graph':>8} {'floor':>6} exact maxerr")
    for r in rows:
        if "us" in r:
            print(f"{r['T']:>6} {r['N']:>5} {r['k']:>3} {r['variant']:>12} {r['us']:9.1f} {r['graph_us']:8.1f} "
                  f"{r['floor_us']:6.1f} {r['exact']!s:5} {r['maxerr']:.2g}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
