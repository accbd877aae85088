"""Plant known kernel bugs one at a time and check that the test suite notices.

For a maintainer (not CI).  Each mutant copies the ``omni_moe`` package into a fresh
temporary directory, replaces one exact piece of source text in the copy, and runs a
small selection of tests under ``TRITON_INTERPRET=1`` with the copy first on
PYTHONPATH.  The real tree is never written.  Outcomes:

    killed (assertion)  a test failed on an assertion: the suite catches the bug
    killed (crash)      the test process died (segfault, abort): caught, but not cleanly
    killed (error)      a test raised something other than an assertion
    survived            every selected test passed: the suite misses the bug

Usage (from the repository root):

    TRITON_INTERPRET=1 python benchmarks/mutation_check.py            # every mutant
    python benchmarks/mutation_check.py --list
    python benchmarks/mutation_check.py --only stream-pair-bound gelu-tanh

The unmutated copy runs the union of the selections first and must pass.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = "omni_moe/ops/"

# (name, file, old text, new text, pytest selection)
MUTANTS = [
    ("stream-pair-bound",
     OPS + "router/pruned.py",
     "ok = (blk < KX) & (q < KX) & ((blk + 1) * (q + 1) <= K)",
     "ok = (blk < KX) & (q < KX) & ((blk + 1) * (q + 1) < K)",
     ["tests/ops/router/test_router_bounds.py::test_stream_every_k_on_the_bound"]),
    ("stream-gsplit-bound",
     OPS + "router/pruned.py",
     "& ((ai + 1) * (bi + 1) <= K))",
     "& ((ai + 1) * (bi + 1) < K))",
     ["tests/ops/router/test_router_bounds.py::test_stream_every_k_on_the_bound"]),
    ("stream-block-skip",
     OPS + "router/pruned.py",
     "if (SP + 1) * (blk - SP + 1) <= KS:",
     "if (SP + 1) * (blk - SP + 1) < KS:",
     ["tests/ops/router/test_router_bounds.py::test_stream_every_k_on_the_bound"]),
    ("gelu-tanh-derivative",
     OPS + "_activations.py",
     "        dz = cdf + a * tl.exp(-0.5 * a * a) * 0.3989422804014327\n",
     "        tt = 2.0 * tl.sigmoid(1.5957691216057308 * (a + 0.044715 * a * a * a)) - 1.0\n"
     "        dz = 0.5 * (1.0 + tt) + 0.5 * a * (1.0 - tt * tt) * 0.7978845608028654 * (\n"
     "            1.0 + 0.134145 * a * a)\n",
     ["tests/ops/expert/test_expert.py::test_matches_float64_three_calls",
      "-k", "bfloat16 and (T7_H8 or T33_H48_E9)"]),
    ("bwd-column-mask-dropped",
     OPS + "router/backward.py",
     "mask = row_ok & (col < N)",
     "mask = row_ok",
     ["tests/ops/router/test_router_bounds.py::test_backward_stays_inside_its_rows"]),
    ("expert-bwd-no-routing-weight",
     OPS + "expert/kernels.py",
     "da = tl.where(ok, dz * w * g, 0.0)",
     "da = tl.where(ok, dz * g, 0.0)",
     ["tests/ops/expert/test_expert.py::test_matches_float64_three_calls",
      "-k", "bfloat16 and T7_H8"]),
    ("swiglu-silu-derivative-sign",
     OPS + "_activations.py",
     "dz = s * (1.0 + a * (1.0 - s))",
     "dz = s * (1.0 - a * (1.0 - s))",
     ["tests/ops/swiglu/test_swiglu.py::test_kernels_once_rounded", "-k", "silu"]),
    ("half-key-nan-branch-deleted",
     OPS + "_triton.py",
     "        o = tl.where((b & 0x7FFF) > 0x7F80, -32768, o)\n",
     "        pass\n",
     ["tests/ops/router/test_special_values.py", "-k", "pruned or positive_nan"]),
    ("int32-offset-pruned-store",
     OPS + "router/pruned.py",
     "ko = tl.arange(0, KP).to(tl.int64)",
     "ko = tl.arange(0, KP)",
     ["tests/test_large_offsets.py::test_router_forward_far_offsets", "-k", "cpu-pruned-warp"]),
    ("int32-offset-router-norm",
     OPS + "router_norm/kernels.py",
     "c.to(tl.int64)[None, :] * stride_xc, mask=m, other=0.0))\n    if MODE != 0:",
     "c[None, :] * stride_xc, mask=m, other=0.0))\n    if MODE != 0:",
     ["tests/test_large_offsets.py::test_router_norm_far_offsets", "-k", "cpu-none"]),
    ("router-norm-finalize-store-mask",
     OPS + "router_norm/kernels.py",
     "tl.store(STATS + cols, mean, mask=ok)",
     "tl.store(STATS + cols, mean)",
     ["tests/ops/router_norm/test_router_norm.py::test_finalize_stays_inside_its_columns"]),
    ("router-norm-stats-not-copied",
     OPS + "router_norm/op.py",
     "ctx.save_for_backward(logits, p, stats, running[1].clone(), running[4].clone())",
     "ctx.save_for_backward(logits, p, stats, running[1], running[4])",
     ["tests/ops/router_norm/test_router_norm.py::test_running_mode_backward_after_a_training_call"]),
    ("large-k-search-no-inf-rotation",
     OPS + "router/large_k.py",
     "start = tl.where((xs.to(tl.int32, bitcast=True) == _NEG_INF_BITS) & (p_inf < N), p_inf, 0)",
     "start = p_inf * 0",
     ["tests/ops/router/test_large_k.py::test_kernel_infinities"]),
    ("large-k-emit-no-inf-rotation",
     OPS + "router/large_k.py",
     "st = tl.where((xb == _NEG_INF_BITS) & (p_inf < N), p_inf, 0)",
     "st = p_inf * 0",
     ["tests/ops/router/test_large_k.py::test_kernel_infinities"]),
    ("large-k-ties-inclusive-prefix",
     OPS + "router/large_k.py",
     "take = tl.minimum(tl.maximum(need - (tl.cumsum(ties, axis=1) - ties), 0), ties)",
     "take = tl.minimum(tl.maximum(need - tl.cumsum(ties, axis=1), 0), ties)",
     ["tests/ops/router/test_large_k.py::test_kernel_is_the_torch_algorithm", "-k", "N8-k9"]),
    ("large-k-snapped-hi-off-by-one",
     OPS + "router/large_k.py",
     "below = tl.max(tl.where(has, f32_key(xs + yv), KEY_NONE), axis=1).to(tl.int64) + 1",
     "below = tl.max(tl.where(has, f32_key(xs + yv), KEY_NONE), axis=1).to(tl.int64)",
     ["tests/ops/router/test_large_k.py::test_adjacent_keys"]),
    ("large-k-split-sort-padding",
     OPS + "router/large_k.py",
     "srt, _ = bitonic_topk(tl.where(ok, sk, pad), sk, LKC, LKC, False, True)",
     "srt, _ = bitonic_topk(tl.where(ok, sk, 0), sk, LKC, LKC, False, True)",
     ["tests/ops/router/test_large_k.py::test_kernel_is_the_torch_algorithm", "-k", "split"]),
    ("large-k-torch-no-inf-rotation",
     OPS + "router/cpu.py",
     "start = torch.where((xs == -inf) & (p_inf < N), p_inf, torch.zeros_like(p_inf))",
     "start = torch.zeros_like(xs, dtype=torch.int64)",
     ["tests/ops/router/test_large_k.py::test_torch_large_k_infinities_every_k"]),
    ("cpu-router-full-product-always",
     OPS + "router/cpu.py",
     "    if use_full_product(T, N, k, x.dtype):",
     "    if True:",
     ["tests/ops/router/test_large_k.py::test_cpu_path_memory_is_linear"]),
    ("router-sorted-dropped",
     OPS + "router/op.py",
     "    return pruned_router_forward(x, y, k, sorted=sorted)",
     "    return pruned_router_forward(x, y, k)",
     ["tests/ops/router/test_large_k.py::test_public_router_past_the_fast_path"]),
    ("sort-bwd-runs-ignore-rows",
     OPS + "router/backward.py",
     "s = tl.where(upper & (pr == h), pv + s, s)",
     "s = tl.where(upper, pv + s, s)",
     ["tests/ops/router/test_large_k.py::test_sort_backward"]),
    ("sort-bwd-block-offset-dropped",
     OPS + "router/backward.py",
     "r = r0 + KB - 1 - (srt & (KB - 1))",
     "r = KB - 1 - (srt & (KB - 1))",
     ["tests/ops/router/test_large_k.py::test_sort_backward", "-k", "blocks"]),
    ("aux-loss-summed-over-layers",
     "omni_moe/hf/losses.py",
     "    return total / count\n",
     "    return total\n",
     ["tests/hf/test_losses.py", "tests/hf/test_hf_model.py", "-k", "aux_loss or balanc"]),
    ("rows-column-block-end",
     OPS + "expert/rows.py",
     "mine = here & (jq >= j0) & (jq < j0 + BLOCK_J)",
     "mine = here & (jq >= j0) & (jq <= j0 + BLOCK_J)",
     ["tests/ops/expert/test_expert.py::test_rows_kernel_tilings"]),
    ("rows-groups-ignore-token",
     OPS + "expert/rows.py",
     "first[1:] = (sorted_rows[1:] != sorted_rows[:-1]) | (tok[1:] != tok[:-1])",
     "first[1:] = sorted_rows[1:] != sorted_rows[:-1]",
     ["tests/ops/expert/test_expert.py::test_rows_kernel_tilings"]),
    ("rows-sentinel-not-zeroed",
     OPS + "expert/rows.py",
     "bad = q_ok & (rq >= NW)",
     "bad = q_ok & (rq > NW)",
     ["tests/ops/expert/test_expert.py::test_out_of_range_indices_masked_by_kernels", "-k", "rows"]),
    ("pair-dot-nan-flushed",
     OPS + "expert/rows.py",
     "tl.store(A + pair, tl.where(valid, d, 0.0), mask=in_range)",
     "tl.store(A + pair, tl.where(valid & (d == d), d, 0.0), mask=in_range)",
     ["tests/ops/expert/test_expert.py::test_non_finite_inputs"]),
    ("rows-last-row-skipped",
     OPS + "expert/rows.py",
     "for row in range(loop_bound(r_first), loop_bound(r_last) + 1):",
     "for row in range(loop_bound(r_first), loop_bound(r_last)):",
     ["tests/ops/expert/test_expert.py::test_rows_kernel_tilings"]),
    ("token-chunk-drops-last-slot",
     OPS + "expert/kernels.py",
     "r_hi = tl.minimum(K, r_lo + CHUNK)",
     "r_hi = tl.minimum(K, r_lo + CHUNK - 1)",
     ["tests/ops/expert/test_expert.py", "-k", "token_forward_split or token_split_default"]),
    ("split-sum-drops-last-chunk",
     OPS + "expert/kernels.py",
     "mask=(s < S)[:, None] & ok[None, :], other=0.0)",
     "mask=(s < S - 1)[:, None] & ok[None, :], other=0.0)",
     ["tests/ops/expert/test_expert.py", "-k", "token_forward_split or token_split_default"]),
    ("token-chunks-floor",
     OPS + "expert/kernels.py",
     "chunks = triton.cdiv(K, chunk)",
     "chunks = max(1, K // chunk)",
     ["tests/ops/expert/test_expert.py", "-k", "token_forward_split or token_split_default"]),
    ("dense-misses-repeated-experts",
     OPS + "expert/dense.py",
     "repeats += tl.where(inc & (owner != r), 1, 0)",
     "repeats += 0",
     ["tests/ops/expert/test_expert.py", "-k", "dense_chunks"]),
    ("dense-ignores-non-finite-table",
     OPS + "expert/dense.py",
     "anybad += tl.where(vok, 0, 1)",
     "anybad += 0",
     ["tests/ops/expert/test_expert.py", "-k", "unused_expert"]),
    ("cpu-chunk-drops-last-token",
     OPS + "expert/cpu.py",
     "return [slice(t0, min(T, t0 + step)) for t0",
     "return [slice(t0, min(T, t0 + step - 1) if step > 1 else t0 + 1) for t0",
     ["tests/ops/expert/test_expert.py", "-k", "reference_path_in_token"]),
    ("dense-checks-the-wrong-table",
     OPS + "expert/dense.py",
     "torch.aminmax(sums) if write_parts",
     "torch.aminmax(rows) if write_parts",
     ["tests/ops/expert/test_expert.py", "-k", "unused_expert"]),
    ("dense-gemms-under-autocast",
     OPS + "expert/dense.py",
     "    with autocast_off(x):\n        for e0 in range(0, E, n_max):",
     "    if True:\n        for e0 in range(0, E, n_max):",
     ["tests/layers/test_autocast.py", "-k", "bfloat16_expert_tables"]),
    ("dense-grads-miss-repeats",
     OPS + "expert/dense.py",
     "token_bad = (tl.load(REPEATS + t) + tl.load(ROWBAD + t)) != 0",
     "token_bad = tl.load(ROWBAD + t) != 0",
     ["tests/ops/expert/test_expert.py", "-k", "dense_chunks"]),
    ("dense-grads-miss-bad-rows",
     OPS + "expert/dense.py",
     "token_bad = (tl.load(REPEATS + t) + tl.load(ROWBAD + t)) != 0",
     "token_bad = tl.load(REPEATS + t) != 0",
     ["tests/ops/expert/test_expert.py", "-k", "infinite_row"]),
    ("dense-grads-keep-bad-rows",
     OPS + "expert/dense.py",
     "hm = torch.where(keep, h, 0) if dup is not None else None",
     "hm = h if dup is not None else None",
     ["tests/ops/expert/test_expert.py", "-k", "non_finite_inputs and dense"]),
    ("dense-grads-under-autocast",
     OPS + "expert/dense.py",
     "    with autocast_off(h):\n        for e0 in range(0, E, n_max):",
     "    if True:\n        for e0 in range(0, E, n_max):",
     ["tests/ops/expert/test_expert.py", "-k", "autocast_leaves"]),
    ("precision-lost-in-backward",
     OPS + "expert/dense.py",
     "fixup, True, dh is not None, PRECISIONS[precision], mark_repeats)",
     "fixup, True, dh is not None, 3, mark_repeats)",
     ["tests/ops/expert/test_expert.py", "-k", "dense_bfloat16_precision"]),
    ("cpu-bmm-under-autocast",
     OPS + "expert/cpu.py",
     "    with autocast_off(hidden_states):      # float32 bmm under the caller's autocast too",
     "    if True:",
     ["tests/ops/expert/test_expert.py", "-k", "autocast_leaves"]),
]


def _copy_package(dst):
    shutil.copytree(os.path.join(ROOT, "omni_moe"), os.path.join(dst, "omni_moe"),
                    ignore=shutil.ignore_patterns("__pycache__"))


def _plant(dst, path, old, new):
    full = os.path.join(dst, path)
    with open(full) as f:
        text = f.read()
    n = text.count(old)
    if n != 1:
        raise SystemExit(f"mutant text found {n} times in {path} (expected once): {old!r}")
    with open(full, "w") as f:
        f.write(text.replace(old, new))


def _env(dst):
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = dst + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _run(dst, selection):
    # -P: do not put the working directory (the real tree) ahead of the copy on sys.path.
    cmd = [sys.executable, "-P", "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *selection]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(dst), capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    dt = time.perf_counter() - t0
    if proc.returncode == 0:
        return "survived", dt, ""
    if proc.returncode < 0 or proc.returncode in (134, 139) or "Fatal Python error" in out:
        return "killed (crash)", dt, ""
    first = next((ln for ln in out.splitlines() if ln.startswith("E ")), "")
    if "AssertionError" in out or first.startswith("E       assert"):
        return "killed (assertion)", dt, first[:160]
    if proc.returncode == 1:
        return "killed (error)", dt, first[:160]
    return f"error (pytest exit {proc.returncode})", dt, out[-300:]


def _check_copy_is_used(dst):
    code = "import omni_moe, sys; sys.stdout.write(omni_moe.__file__)"
    got = subprocess.run([sys.executable, "-P", "-c", code], cwd=ROOT, env=_env(dst),
                         capture_output=True, text=True).stdout
    if not got.startswith(dst):
        raise SystemExit(f"the copy is not what the tests import ({got!r}); check PYTHONPATH")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="mutant names to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--skip-baseline", action="store_true",
                    help="do not run the unmutated copy first")
    args = ap.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.only or m[0] in args.only]
    if args.list:
        for name, path, *_rest, sel in MUTANTS:
            print(f"{name:32s} {path:42s} {' '.join(sel)}")
        return 0
    if args.only and len(mutants) != len(args.only):
        known = {m[0] for m in MUTANTS}
        raise SystemExit(f"unknown mutant(s): {sorted(set(args.only) - known)}")
    # the time column is the test processes' wall time: say what they share the CPU with
    from omni_moe.bench.common import report_threads

    report_threads("mutation_check.py")
    if not args.skip_baseline:
        with tempfile.TemporaryDirectory(prefix="omni_mut_") as dst:
            _copy_package(dst)
            _check_copy_is_used(dst)
            for name, _p, _o, _n, sel in mutants:
                outcome, dt, detail = _run(dst, sel)
                if outcome != "survived":
                    raise SystemExit(f"baseline fails the selection of {name}: {outcome} {detail}")
        print("baseline: every selection passes on the unmutated copy")
    rows = []
    for name, path, old, new, sel in mutants:
        with tempfile.TemporaryDirectory(prefix="omni_mut_") as dst:
            _copy_package(dst)
            _plant(dst, path, old, new)
            outcome, dt, detail = _run(dst, sel)
        rows.append((name, outcome, dt, detail))
        print(f"{name:32s} {outcome:20s} {dt:6.0f} s  {detail}", flush=True)
    print()
    print("| mutant | outcome | time (s) |")
    print("|---|---|---|")
    for name, outcome, dt, _ in rows:
        print(f"| {name} | {outcome} | {dt:.0f} |")
    return 0 if all(r[1] != "survived" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
