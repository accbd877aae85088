"""``omni-moe bench layer --preset paper``: the OmniMoE paper's efficiency experiment.

The paper (arXiv 2602.05711, its Table A and Figure 4) times one layer at d = 1024 with
102,400 atomic experts (N = 320) and a shared MLP of 1024, K = 512 to 4096 experts per
token, 1k to 16k tokens, beside PEER (token-centric execution; its own setting: the same
102,400 experts, K = 1250 to 12500).  The preset runs, in this order (T tokens, K):

    tokens at the smallest K        (1024, 512) (2048, 512) (4096, 512) (8192, 512) (16384, 512)
    K at 1,024 tokens               (1024, 1024) (1024, 2048) (1024, 4096)
    4,096 tokens at the largest K   (4096, 4096)
    PEER's own K, 1,024 tokens      (1024, 1250) (1024, 12500)   -- peer_layer only

with H = I = 1024, E = 102,400, variants ``layer`` (OmniMoE) and ``peer_layer`` (the same
layer, router and shared MLP, with its expert sum gathered token by token as PEER does:
(T, K, H) rows of both tables and einsums; ``omni_moe.bench.peers.peer_layer``).  At
PEER's K both compute the same model at larger K; where the (T, K, H) tensors do not fit,
the row reports out of memory and the sweep goes on.

Each row: forward (no grad) and training forward+backward, eager medians and CUDA-graph
replay, peak extra memory of each (``torch.cuda.max_memory_allocated`` above what was
allocated before the call, statistics reset first), and the row's wall time.  ``--cases
'T,k;...'`` picks rows (H, I, E from the preset), ``--variants`` the variants.

Without CUDA the same rows run at CPU size: T and K divided by 32 (PEER's K rounded: 39,
391), H = I = 32, E = 400 (N = 20) -- PyTorch paths (or the interpreter under
TRITON_INTERPRET=1), a check that the sweep runs, not a measurement of the paper's sizes.

The paper's own figures (published, A100s, not measured here) are printed under the table
as a reference: ``PUBLISHED``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BOTH = ("layer", "peer_layer")


@dataclass(frozen=True)
class Preset:
    """A fixed sweep: the model's sizes and its rows (T, K, variants) in running order."""

    hidden: int
    intermediate: int
    experts: int
    rows: tuple
    where: str

    def cases(self):
        """[((T, H, I, E, K), variants), ...] in running order."""
        return [((T, self.hidden, self.intermediate, self.experts, K), variants)
                for T, K, variants in self.rows]


def _paper_rows(div: int) -> tuple:
    rows = [(t // div, 512 // div, BOTH) for t in (1024, 2048, 4096, 8192, 16384)]
    rows += [(1024 // div, k // div, BOTH) for k in (1024, 2048, 4096)]
    rows += [(4096 // div, 4096 // div, BOTH)]
    rows += [(1024 // div, round(k / div), ("peer_layer",)) for k in (1250, 12500)]
    return tuple(rows)


PRESETS = {
    "paper": {
        "cuda": Preset(1024, 1024, 102_400, _paper_rows(1), "CUDA"),
        "cpu": Preset(32, 32, 400, _paper_rows(32), "CPU size: T and K / 32"),
    },
}

# What the paper reports (arXiv 2602.05711, abstract, Table A, Figure 4), measured on A100s
# with its own code: a reference printed beside ours, never compared as like for like.
PUBLISHED = {
    "source": "arXiv 2602.05711 (OmniMoE), A100 GPUs, the authors' code",
    "what": "one layer's inference latency at 4,096 tokens, d = 1024, 102,400 experts",
    "fwd_ms": {"OmniMoE": 6.7, "PEER": 73.0, "DeepSeekMoE": 102.0},
    "peak_memory": "about 2-3 GiB across its sweep (Figure 4)",
}


def resolve(name: str, cuda: bool) -> Preset:
    """The preset ``name`` at this device's size."""
    return PRESETS[name]["cuda" if cuda else "cpu"]


def published_lines(rows) -> list[str]:
    """The paper's own figures, for a run at the paper's sizes (else nothing)."""
    full = PRESETS["paper"]["cuda"]
    if not any((r.get("hidden"), r.get("intermediate"), r.get("experts"))
               == (full.hidden, full.intermediate, full.experts) for r in rows):
        return []
    ms = ", ".join(f"{k} {v:g} ms" for k, v in PUBLISHED["fwd_ms"].items())
    return [f"published, not measured here ({PUBLISHED['source']}): {PUBLISHED['what']}: {ms}; "
            f"peak memory {PUBLISHED['peak_memory']}. Another card, other software and other "
            "PEER / DeepSeekMoE code: a reference point, not a like-for-like comparison."]


# --------------------------------------------------------------------------- table
def _oom_or(r, v, mode, value, fmt):
    """A measured cell; 'OOM' where it (or, for a graph, its eager twin) ran out of memory."""
    from .layer import FWD_FLAG

    flagged = False
    if isinstance(value, tuple):  # (ms, flagged)
        value, flagged = value
    if value is None:
        errors = r.get("errors") or {}
        keys = [f"{v} {mode}", f"{v} {mode.removesuffix(' graph')}"]
        return "OOM" if any(errors.get(k) == "out of memory" for k in keys) else "-"
    return format(value, fmt) + (FWD_FLAG if flagged else "")


def format_table(rows, gpu: bool) -> str:
    """Markdown table, one line per (row, variant): the paper's layout (latency and peak
    memory, forward and training step); 'OOM' where a measurement ran out of memory,
    '!' where a forward is slower than its training step (footnoted)."""
    from .layer import FWD_FLAG_NOTE, _cell, _ok, _variants_of, fwd_over_step

    def t(d, mode):
        return lambda r, v: (r.get(d) or {}).get(f"{v} {mode}")

    def fwd(d):
        return lambda r, v: ((r.get(d) or {}).get(f"{v} fwd"), fwd_over_step(r, v, d))

    def ok(r, v):  # the layer's own check is its expert path's, against the oracle
        return r["check"]["pass"] if v == "layer" and "check" in r else _ok(r, v)

    def vs_layer(r, v):
        a, b = (r.get("times_ms") or {}).get(f"{v} fwd"), (r.get("times_ms") or {}).get("layer fwd")
        return a / b if v != "layer" and a and b else None

    # (header, value, format, error key's mode or None, CUDA only)
    cols = [("T", lambda r, v: r["T"], "d", None, False), ("K", lambda r, v: r["k"], "d", None, False),
            ("active M", lambda r, v: r.get("active_params", math.nan) / 1e6, ".4g", None, False),
            ("variant", lambda r, v: v, "s", None, False), ("ok", ok, "ok", None, False),
            ("fwd ms", fwd("times_ms"), ".3f", "fwd", False),
            ("fwd graph ms", fwd("graph_ms"), ".3f", "fwd graph", True),
            ("f+b ms", t("times_ms", "fwd+bwd"), ".3f", "fwd+bwd", False),
            ("f+b graph ms", t("graph_ms", "fwd+bwd"), ".3f", "fwd+bwd graph", True),
            ("fwd peak MiB", t("peak_mem_MiB", "fwd"), ",.0f", "fwd", True),
            ("f+b peak MiB", t("peak_mem_MiB", "fwd+bwd"), ",.0f", "fwd+bwd", True),
            ("fwd / layer", vs_layer, ".2f", None, False),
            ("row s", lambda r, v: r.get("row_s"), ".1f", None, False)]
    cols = [c for c in cols if gpu or not c[4]]
    lines = ["| " + " | ".join(c[0] for c in cols) + " |",
             "|" + "|".join("---" if c[2] in ("s", "ok") else "---:" for c in cols) + "|"]
    notes, flagged = [], False
    for r in rows:
        if "times_ms" not in r:
            continue
        for v in _variants_of(r):
            cells = []
            for _, get, fmt, mode, _ in cols:
                value = get(r, v)
                cells.append(_oom_or(r, v, mode, value, fmt) if mode else _cell(value, fmt))
            lines.append("| " + " | ".join(cells) + " |")
            flagged = flagged or fwd_over_step(r, v) or (gpu and fwd_over_step(r, v, "graph_ms"))
        for key, why in (r.get("errors") or {}).items():
            if why != "out of memory":
                notes.append(f"T={r['T']} K={r['k']} {key}: {why}")
    return "\n".join(lines + [f"  {n}" for n in notes + ([FWD_FLAG_NOTE] if flagged else [])])


def legend(gpu: bool, rows) -> str:
    sizes = sorted({(r["hidden"], r["intermediate"], r["experts"]) for r in rows})
    what = "; ".join(f"H={h}, I={i}, E={e:,} (N={math.isqrt(e)})" for h, i, e in sizes)
    text = (f"{what}. K: atomic experts per token; active M: parameters one token uses "
            "(3*H*I shared MLP + 2*N*H router gates + 2*K*H experts), millions; layer: OmniMoE; "
            "peer_layer: the same layer with its expert sum gathered per token (PEER-style); "
            "ok: the layer's expert path checked against a float32 oracle, peer_layer against "
            "the layer; fwd: forward under no_grad; f+b: training forward+backward")
    if gpu:
        text += ("; graph: replayed from a CUDA graph; peak: extra memory of one call above "
                 "what was allocated before it; OOM: out of memory")
    return text + "; row s: wall time of the row (set-up, checks and timing)"


# --------------------------------------------------------------------------- plot
def plot(rows, path, title, gpu: bool) -> None:
    """The paper's Figure 4 layout: forward latency and peak memory against tokens (rows
    at the smallest K) and against active parameters (rows at the smallest T), OmniMoE
    and its PEER-style twin; CUDA-graph latency dashed, training-step memory dashed;
    an 'x' on the top edge where a variant ran out of memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from .layer import _variants_of

    rows = [r for r in rows if "times_ms" in r]
    if not rows:
        raise ValueError("no measured rows to plot")
    k0, t0 = min(r["k"] for r in rows), min(r["T"] for r in rows)
    series = [("tokens", lambda r: r["T"], f"tokens (K = {k0})", [r for r in rows if r["k"] == k0]),
              ("active", lambda r: r.get("active_params", math.nan) / 1e6,
               f"active parameters per token, millions (T = {t0})", [r for r in rows if r["T"] == t0])]
    styles = {"layer": ("OmniMoE", "tab:blue"), "peer_layer": ("PEER-style", "tab:orange")}
    names = list(dict.fromkeys(v for r in rows for v in _variants_of(r)))
    metrics = [("latency ms", [("times_ms", "fwd", "-", "fwd eager")]
                + ([("graph_ms", "fwd", "--", "fwd CUDA graph")] if gpu else [])),
               ("peak extra MiB", [("peak_mem_MiB", "fwd", "-", "inference"),
                                   ("peak_mem_MiB", "fwd+bwd", "--", "training step")])]
    if not any(r.get("peak_mem_MiB") and any(v is not None for v in r["peak_mem_MiB"].values())
               for r in rows):
        metrics = metrics[:1]  # no memory figures (CPU)
    fig, axes = plt.subplots(len(metrics), 2, figsize=(11, 4 * len(metrics)), squeeze=False)
    for col, (_, xof, xlabel, sel) in enumerate(series):
        sel = sorted(sel, key=xof)
        for row_i, (ylabel, lines) in enumerate(metrics):
            ax = axes[row_i, col]
            drawn, ooms = False, []
            for v in names:
                label, color = styles.get(v, (v, None))
                for d, mode, ls, what in lines:
                    pts = [(xof(r), (r.get(d) or {}).get(f"{v} {mode}"), r["k"]) for r in sel
                           if v in _variants_of(r)]
                    pts = [(x, y, k) for x, y, k in pts if y]
                    ooms += [(xof(r), color, label) for r in sel
                             if (r.get("errors") or {}).get(f"{v} {mode}") == "out of memory"]
                    if pts:
                        xs, ys, ks = zip(*pts)
                        ax.plot(xs, ys, ls, marker="o", color=color, label=f"{label}, {what}")
                        drawn = True
                        if col == 1 and ls == "-":  # which K each point of the K sweep is
                            for x, y, k in pts:
                                ax.annotate(f"K={k}", (x, y), textcoords="offset points", xytext=(3, 3),
                                            fontsize=6, color=color)
            if not drawn:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            else:
                ax.set_xscale("log")
                ax.set_yscale("log")
                if col == 0:
                    ax.set_xticks(sorted({xof(r) for r in sel}))
                else:
                    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                plain = FuncFormatter(lambda x, _: f"{x:.6g}")
                ax.xaxis.set_major_formatter(plain)
                ax.xaxis.set_minor_formatter(NullFormatter())
                ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_major_formatter(plain)
                ax.yaxis.set_minor_formatter(NullFormatter())
                top, named = ax.get_ylim()[1], set()
                for x, color, label in dict.fromkeys(ooms):
                    ax.plot([x], [top], "x", color=color, markersize=10, clip_on=False,
                            label=None if label in named else f"{label}: out of memory")
                    named.add(label)
                ax.legend(fontsize="x-small")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3, which="both")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
