"""What a profiled training step did on the GPU: a summary of one torch.profiler Chrome
trace (``prof.export_chrome_trace``), for telling compute from exposed communication.

The GPU activities of a trace (kernels, memcpys, memsets) are split into communication
(NCCL kernels) and the rest; intervals are merged per kind, so overlapping work counts
once.  Over the span from the first to the last activity:

  compute_busy_ms   time some non-communication activity runs
  comm_ms           time some NCCL kernel runs
  exposed_comm_ms   time an NCCL kernel runs and nothing else does (communication the
                    step waits for, not hidden behind compute)
  idle_ms           time nothing runs (host-bound gaps, waiting for another rank's
                    launch before a collective can start)

plus per-stream busy time and the kernels taking the most time.  The NCCL kernel of a
collective starts when this rank launches it and runs until every rank has joined, so
a rank that waits for a slower peer counts that wait as communication.
"""

from __future__ import annotations

import gzip
import json

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def _merge(intervals):
    """Disjoint sorted union of (start, end) intervals."""
    out = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def _length(merged) -> float:
    return sum(e - s for s, e in merged)


def _subtract(a, b):
    """Length of the union ``a`` minus the union ``b`` (both merged)."""
    total, j = 0.0, 0
    for s, e in a:
        cur = s
        while j < len(b) and b[j][1] <= cur:
            j += 1
        k = j
        while k < len(b) and b[k][0] < e:
            if b[k][0] > cur:
                total += b[k][0] - cur
            cur = max(cur, b[k][1])
            k += 1
        if cur < e:
            total += e - cur
    return total


def load_trace(path: str) -> dict:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def is_comm(name: str) -> bool:
    return name.lower().startswith("nccl")


def summarise(trace: dict, top: int = 12) -> dict:
    """Summary (milliseconds) of the GPU activities of a Chrome trace dict."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    acts = [e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES
            and "dur" in e]
    if not acts:
        return {"gpu_events": 0}
    comm, rest, streams, kernels = [], [], {}, {}
    for e in acts:
        s = float(e["ts"])
        iv = (s, s + float(e["dur"]))
        (comm if is_comm(e.get("name", "")) else rest).append(iv)
        streams.setdefault(str(e.get("args", {}).get("stream", e.get("tid"))), []).append(iv)
        k = kernels.setdefault(e.get("name", "?"), [0, 0.0])
        k[0] += 1
        k[1] += float(e["dur"])
    comm_m, rest_m = _merge(comm), _merge(rest)
    start = min(iv[0] for iv in comm + rest)
    end = max(iv[1] for iv in comm + rest)
    busy = _length(_merge(comm + rest))
    ms = 1e-3  # trace times are microseconds
    return {
        "gpu_events": len(acts),
        "span_ms": (end - start) * ms,
        "compute_busy_ms": _length(rest_m) * ms,
        "comm_ms": _length(comm_m) * ms,
        "exposed_comm_ms": _subtract(comm_m, rest_m) * ms,
        "idle_ms": (end - start - busy) * ms,
        "streams_busy_ms": {k: _length(_merge(v)) * ms for k, v in sorted(streams.items())},
        "top_kernels": [{"name": n[:120], "calls": c, "ms": t * ms}
                        for n, (c, t) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]],
    }


def format_summary(s: dict) -> str:
    if not s.get("gpu_events"):
        return "no GPU activity in the trace"
    lines = [f"span {s['span_ms']:.2f} ms: compute busy {s['compute_busy_ms']:.2f}, "
             f"NCCL {s['comm_ms']:.2f} (exposed {s['exposed_comm_ms']:.2f}), idle {s['idle_ms']:.2f}"]
    lines += [f"  {k['ms']:8.3f} ms {k['calls']:5d}x  {k['name'][:90]}" for k in s["top_kernels"]]
    return "\n".join(lines)
