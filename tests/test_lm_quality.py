"""benchmarks/lm_quality.py: the --tiny run end to end, parameter counts against hand
counts, the matching of the default sizes, the corpus split rule, the PEER and MoE
modules against brute force, arm specs.  PyTorch paths (TRITON_INTERPRET off)."""

import hashlib
import importlib.util
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import script_module

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def q():
    yield from script_module("benchmarks/lm_quality.py", "lm_quality")


HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu,
                                              pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")])]


# --------------------------------------------------------------------------- the tiny run
def test_tiny_run_rows(q, tmp_path, capsys, torch_path):
    path = tmp_path / "q.json"
    argv = ["--tiny", "--json", str(path)]
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    if has_mpl:
        argv += ["--plot", str(tmp_path / "q.png")]
    assert q.main(argv) == 0
    out = capsys.readouterr().out
    data = json.loads(path.read_text())
    rows = data["rows"]
    assert [r["arm"] for r in rows] == ["dense", "omnimoe", "peer", "moe"]   # one seed each
    info = data["corpus"]
    assert info["files_train"] > 0 and info["files_val"] > 0 and info["bytes_val"] > 0
    for r in rows:
        assert math.isfinite(r["val_bpb"]) and 0 < r["val_bpb"] < 8, r   # random: log2(257) > 8
        assert r["val_loss"] == pytest.approx(r["val_bpb"] * math.log(2))
        assert r["tokens"] == 16384 and r["stopped_by"] == "tokens"
        curve = r["curve"]
        assert len(curve) == 4
        toks, secs, bpbs = zip(*curve)
        assert all(a < b for a, b in zip(toks, toks[1:])), curve
        assert all(a <= b for a, b in zip(secs, secs[1:])), curve
        assert toks[-1] == r["tokens"] and bpbs[-1] == r["val_bpb"]
        assert bpbs[-1] < bpbs[0] - 0.5, curve                  # it learns
        assert r["tokens_per_s"] > 0 and r["env"]["torch"] and r["config"]["ffn"]
        assert r["match"]["ok"], r["match"]
        assert f"\n{r['arm']:34s}" in out
    dense, omni, peer, moe = rows
    # the matching, recomputed from the counts: active FFN parameters of every arm
    # within the tolerance of dense; total of peer and moe within it of omnimoe
    for r in rows:
        assert abs(r["ffn_active_params"] / dense["ffn_active_params"] - 1) <= q.MATCH_TOL, r["arm"]
        # the same trunk: what is not FFN is equal
        assert r["total_params"] - r["ffn_total_params"] == dense["total_params"] - dense["ffn_total_params"]
        assert r["active_params"] - r["ffn_active_params"] == r["total_params"] - r["ffn_total_params"]
    for r in (peer, moe):
        assert abs(r["ffn_total_params"] / omni["ffn_total_params"] - 1) <= q.MATCH_TOL, r["arm"]
    assert omni["ffn_total_params"] > 2 * dense["ffn_total_params"]
    assert dense["experts_used"] is None and 0 < omni["experts_used"] <= 1
    if has_mpl:
        assert (tmp_path / "q.png").stat().st_size > 10_000

    # a saved run merges and reprints without training
    again = tmp_path / "again.json"
    assert q.main(["--from-json", str(path), str(path), "--json", str(again)]) == 0
    out = capsys.readouterr().out
    assert len(json.loads(again.read_text())["rows"]) == 8
    assert "vs dense" in out and "\nomnimoe" in out


def test_time_budget_stops_the_arm(q, tmp_path, torch_path):
    path = tmp_path / "t.json"
    assert q.main(["--tiny", "--arms", "dense", "--tokens", "0", "--budget-s", "1", "--evals", "2",
                   "--json", str(path)]) == 0
    (row,) = json.loads(path.read_text())["rows"]
    assert row["stopped_by"] == "time" and row["train_s"] >= 1.0
    assert len(row["curve"]) >= 2 and row["curve"][-1][1] == row["train_s"]


# --------------------------------------------------------------------------- parameter counts
def test_param_counts_by_hand(q, torch_path):
    """H = 8, 2 layers, 2 heads, vocabulary 257, untied head; counts written out."""
    sizes = q.Sizes(hidden=8, layers=2, heads=2, seq=8, batch=2, dense_width=12, shared_width=8,
                    experts=16, peer_heads=2, peer_key_dim=4, moe_k=2)
    trunk = 2 * 257 * 8 + 2 * (4 * 8 * 8 + 2 * 8) + 8       # embed, head, attention + norms, final norm
    want = {
        # FFN per layer (active, total)
        "dense": (3 * 8 * 12, 3 * 8 * 12),
        # shared 3*8*8, router 2*4*8, tables 2*16*8, K = (3*(12-8) - 2*4) / 2 = 2 experts of 2*8
        "omnimoe": (192 + 64 + 2 * 2 * 8, 192 + 64 + 256),
        "omnimoe:shared=0:k=3": (64 + 3 * 2 * 8, 64 + 256),
        # query 8*(2*4), sub-keys 2 heads*2*4*2, tables 256; 2 heads * 3 experts of 2*8
        "peer:experts=16:k=3:heads=2:key_dim=4": (64 + 32 + 2 * 3 * 2 * 8, 64 + 32 + 256),
        # router 4*8; each expert 3*8*5; 2 of 4 active
        "moe:experts=4:k=2:width=5": (32 + 2 * 120, 32 + 4 * 120),
    }
    for spec, (fa, ft) in want.items():
        plan = q.resolve(spec, sizes, q.TrainConfig(), 1)
        c = q.count_params(q.build_model(plan, sizes, 0))
        assert c == {"ffn_active": 2 * fa, "ffn_total": 2 * ft, "active": trunk + 2 * fa,
                     "total": trunk + 2 * ft}, spec
    assert dict(q.resolve("omnimoe", sizes, q.TrainConfig(), 1).ffn)["k"] == 2


def test_default_sizes_match(q):
    """The GPU configuration: every arm's FFN within the tolerance (built on the meta
    device), K in the hundreds, and the docs' formulas equal the module counts."""
    sizes = q.Sizes()
    plans = q.resolve_all("dense,omnimoe,peer,moe", sizes, q.TrainConfig(), 2)
    ref = q.plan_table(plans, sizes, say=lambda *a, **k: None)
    H, L = sizes.hidden, sizes.layers
    assert ref["ffn_active"] == L * 3 * H * sizes.dense_width
    f = dict(plans[1].ffn)
    assert 100 <= f["k"] < 1000 and f["experts"] == sizes.experts
    assert ref["ffn_total"] == L * q.omnimoe_counts(H, f["shared"], f["experts"], f["k"])[1]
    assert q.omnimoe_counts(H, f["shared"], f["experts"], f["k"])[0] == 3 * H * sizes.dense_width
    for plan, formula in ((plans[2], q.peer_counts), (plans[3], q.moe_counts)):
        c = q.count_params(q.build_model(plan, sizes, 0, "meta"))
        p = dict(plan.ffn)
        args = ((p["experts"] ** 0.5, p["heads"], p["key_dim"], p["k"]) if plan.base == "peer"
                else (p["experts"], p["k"], p["width"]))
        a, t = formula(H, *(int(v) for v in args))
        assert (c["ffn_active"], c["ffn_total"]) == (L * a, L * t), plan.label
        assert abs(a / (3 * H * sizes.dense_width) - 1) <= q.MATCH_TOL
        assert abs(L * t / ref["ffn_total"] - 1) <= q.MATCH_TOL


def test_derived_sizes_keep_active_params(q):
    sizes = q.TINY
    A = 3 * sizes.hidden * sizes.dense_width
    for spec in ("omnimoe:k=12", "omnimoe:shared=100", "omnimoe:experts=1024"):
        f = dict(q.resolve(spec, sizes, q.TrainConfig(), 1).ffn)
        a, _ = q.omnimoe_counts(sizes.hidden, f["shared"], f["experts"], f["k"])
        assert abs(a / A - 1) <= q.MATCH_TOL, (spec, f)
    plan = q.resolve("omnimoe:k=12:shared=100", sizes, q.TrainConfig(), 1)
    assert not plan.enforce_match


# --------------------------------------------------------------------------- corpus
def test_split_rule(q):
    files = q.list_files([q.stdlib_root()])
    assert len(files) > 100 and not any("site-packages" in r for _, r in files)
    train, val = q.split_files(files, 0.05)
    assert (train, val) == q.split_files(list(files), 0.05)            # deterministic
    assert not set(train) & set(val) and sorted(train + val) == sorted(files)
    assert 0.02 < len(val) / len(files) < 0.09
    for _, rel in files:   # the documented rule, written out independently
        h = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big")
        assert q.is_validation(rel, 0.05) == (h < 0.05 * 2**64), rel
    # pinned: a change of the rule changes these
    assert [q.is_validation(r, 0.05) for r in ("copyreg.py", "email/__init__.py", "os.py", "typing.py")] \
        == [True, True, False, False]
    # the relative path decides, not where the tree lives
    assert q.split_files([("/a", "x/y.py"), ("/b", "x/y.py")], 0.5) in (
        ([("/a", "x/y.py"), ("/b", "x/y.py")], []), ([], [("/a", "x/y.py"), ("/b", "x/y.py")]))


def test_corpus_files_and_tokens(q, tmp_path):
    for d in ("pkg", "site-packages", "__pycache__", ".hidden"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "m.py").write_bytes(b"x = 1\n")
    (tmp_path / "pkg" / "notes.txt").write_bytes(b"text")
    (tmp_path / "a.py").write_bytes(b"\xff\x00")
    files = q.list_files([str(tmp_path)])
    assert files == [(str(tmp_path), "a.py"), (str(tmp_path), "pkg/m.py")]
    assert q.list_files([str(tmp_path)], (".py", ".txt"))[-1] == (str(tmp_path), "pkg/notes.txt")
    tokens, nbytes = q._token_stream(files)
    assert tokens.tolist() == [256, 255, 0, 256, *b"x = 1\n"] and nbytes == 8
    # evenly spaced validation windows cover the stream from its first to its last token
    data = torch.arange(1000)
    w = q.val_windows(data, 10, 50)
    assert w.shape == (5, 11) and w[0, 0] == 0 and w[-1, -1] == 999
    assert (w[:, 1:] - w[:, :-1] == 1).all()


def test_repeat_note(q):
    """The warning names the passes over the training bytes, only past one pass."""
    assert q.repeat_note(None, 9_207_240) is None
    assert q.repeat_note(9_000_000, 9_207_240) is None
    note = q.repeat_note(25_000_000, 9_207_240)
    assert note.startswith("warning:") and "2.7 passes" in note and "9.2 MB" in note and "--corpus" in note


def test_evaluate_excludes_separator_targets(q):
    """Bits per byte: separator targets are not scored."""
    sizes = q.TINY

    class Fixed(torch.nn.Module):      # predicts token 65 with probability 1/2, the rest uniform
        def forward(self, input_ids, **kw):
            logits = torch.zeros(*input_ids.shape, q.VOCAB)
            logits[..., 65] = math.log(q.VOCAB - 1)
            return type("Out", (), {"logits": logits})()

    plan = q.resolve("dense", sizes, q.TrainConfig(), 1)
    windows = torch.tensor([[65, 65, q.SEP, 65], [q.SEP, 65, 65, q.SEP]])
    nats = q.evaluate(Fixed(), plan, windows, 2, torch.device("cpu"), q.contextlib.nullcontext)
    assert nats == pytest.approx(math.log(2))       # 4 byte targets, each at p = 1/2


def test_lr_schedule(q):
    assert q.lr_factor(0, 0.0, 10, 0.2) == pytest.approx(0.1)
    assert q.lr_factor(9, 0.1, 10, 0.2) == 1.0 and q.lr_factor(50, 0.8, 10, 0.2) == 1.0
    assert q.lr_factor(50, 0.9, 10, 0.2) == pytest.approx(0.5)
    assert q.lr_factor(50, 1.0, 10, 0.2) == 0.0 and q.lr_factor(50, 0.99, 10, 0.0) == 1.0


# --------------------------------------------------------------------------- FFN modules
def test_peer_matches_brute_force(q, path):
    """On the kernels (CUDA or the interpreter) and the PyTorch path: strided router
    inputs, experts repeated across heads."""
    g = torch.Generator().manual_seed(0)
    H, heads, key_dim, k, E = 16, 3, 6, 5, 49
    m = q.PEER(H, E, heads, key_dim, k).to(path)
    x = torch.randn(2, 7, H, generator=g).to(path).requires_grad_(True)   # non-power-of-two sizes, odd k
    with torch.no_grad():
        m.query.weight.copy_(torch.randn(m.query.weight.shape, generator=g) * 0.3)
    out = m(x)
    params = [x, m.query.weight, m.sub_keys, m.up_embed.weight, m.down_embed.weight]
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, H, device=path)).sum(), params)

    xd, qw, keys, up, down = (p.detach().cpu().double().requires_grad_(True) for p in params)
    h = xd.reshape(-1, H)
    qq = F.layer_norm((h @ qw.t()).view(-1, heads, 2, key_dim // 2), (key_dim // 2,))
    ref = torch.zeros_like(h)
    n = 7
    for hd in range(heads):
        s1 = qq[:, hd, 0] @ keys[hd, 0].t()                     # (T, n)
        s2 = qq[:, hd, 1] @ keys[hd, 1].t()
        grid = (s1[:, :, None] + s2[:, None, :]).reshape(-1, n * n)   # every expert's score
        top, idx = grid.topk(k, dim=-1)
        w = torch.softmax(top, dim=-1)
        a = F.silu(torch.einsum("th,tkh->tk", h, up[idx]))
        ref = ref + torch.einsum("tk,tkh->th", a * w, down[idx])
    ref = ref.view_as(xd)
    assert torch.allclose(out.cpu().double(), ref, atol=1e-5, rtol=1e-4)
    want = torch.autograd.grad((ref * torch.linspace(-1, 1, H).double()).sum(), [xd, qw, keys, up, down])
    for got, exp in zip(grads, want):
        assert torch.allclose(got.cpu().double(), exp, atol=1e-5, rtol=1e-4)
    assert m.last_indices.shape == (14, heads * k)


@pytest.mark.parametrize("device", DEVICES)
def test_token_choice_moe_matches_brute_force(q, device):
    g = torch.Generator().manual_seed(1)
    H, n, k, width = 12, 5, 3, 7
    m = q.TokenChoiceMoE(H, n, k, width)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    m.to(device)
    x = torch.randn(3, 5, H, generator=g).to(device).requires_grad_(True)
    out = m(x)
    params = [x, m.router.weight, m.gate_up, m.down]
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, H, device=device)).sum(), params)

    xd, r, gu, dn = (p.detach().cpu().double().requires_grad_(True) for p in params)
    h = xd.reshape(-1, H)
    probs = torch.softmax(h @ r.t(), dim=-1)
    ref = torch.zeros_like(h)
    for t in range(h.shape[0]):                                  # token by token, every expert
        sel = probs[t].topk(k).indices
        for e in sel.tolist():
            gg, uu = (gu[e] @ h[t]).chunk(2)
            ref[t] = ref[t] + probs[t, e] / probs[t, sel].sum() * (dn[e] @ (F.silu(gg) * uu))
    ref = ref.view_as(xd)
    assert torch.allclose(out.cpu().double(), ref, atol=1e-5, rtol=1e-4)
    want = torch.autograd.grad((ref * torch.linspace(-1, 1, H).double()).sum(), [xd, r, gu, dn])
    for got, exp in zip(grads, want):
        assert torch.allclose(got.cpu().double(), exp, atol=1e-5, rtol=1e-4)
    # balance loss: n * sum_i (share of slots on i) * (mean probability of i)
    share = torch.bincount(probs.topk(k).indices.reshape(-1), minlength=n).double() / (h.shape[0] * k)
    assert m.aux_loss().item() == pytest.approx(n * (share * probs.mean(0)).sum().item(), rel=1e-5)


def test_omnimoe_variants(q, torch_path):
    sizes = q.TINY
    h = torch.randn(10, sizes.hidden)
    soft = q.build_model(q.resolve("omnimoe:weights=softmax", sizes, q.TrainConfig(), 1), sizes, 0)
    exp = q.build_model(q.resolve("omnimoe", sizes, q.TrainConfig(), 1), sizes, 0)
    s_soft, i_soft = soft.model.layers[0].mlp.route(h)
    s_exp, i_exp = exp.model.layers[0].mlp.route(h)
    assert torch.equal(i_soft, i_exp)                             # the same experts
    assert torch.allclose(s_soft.exp().sum(-1), torch.ones(10))   # Eq. 2: weights sum to 1
    assert (s_exp.exp().sum(-1) < 0.99).all()                     # joint probabilities: less
    # every arm's trunk is the dense model's of the same seed
    dense = q.build_model(q.resolve("dense", sizes, q.TrainConfig(), 1), sizes, 0)
    peer = q.build_model(q.resolve("peer", sizes, q.TrainConfig(), 1), sizes, 0)
    trunk = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    assert len(trunk) == 3 + 6 * sizes.layers
    for model in (exp, peer):
        sd = model.state_dict()
        assert all(torch.equal(sd[k], v) for k, v in trunk.items())
    none = q.build_model(q.resolve("omnimoe:shared=0", q.replace(sizes, experts=1024), q.TrainConfig(), 1),
                         q.replace(sizes, experts=1024), 0)
    blk = none.model.layers[0].mlp
    assert not any(p.requires_grad for p in (blk.gate_proj.weight, blk.up_proj.weight, blk.down_proj.weight))
    scores, idx = blk.route(h)
    experts = q.omni_expert(h, blk.up_embed.weight, blk.down_embed.weight, scores.exp(), idx)
    assert torch.allclose(blk(h), experts, atol=1e-6)             # nothing from a shared MLP


# --------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("arms, words", [
    ("dense,omnimoe:foo=1", ["foo", "omnimoe:foo=1"]),
    ("densest", ["densest"]),
    ("omnimoe:router_norm=rms", ["router_norm"]),
    ("omnimoe:experts=15", ["perfect square"]),
    ("omnimoe:k=x", ["k="]),
    ("dense,dense", ["twice"]),
    ("dense:seeds=3", ["seeds=3"]),
    ("peer:key_dim=7", ["key_dim", "even"]),
    ("moe:k=9:experts=8", ["k must be <= experts"]),
])
def test_bad_arms_one_line_exit_2(q, capsys, arms, words):
    assert q.main(["--tiny", "--arms", arms]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(w in err for w in words), err


def test_bad_options_exit_2(q, capsys, tmp_path):
    for argv, word in ((["--tiny", "--tokens", "0"], "budget"), (["--tiny", "--seeds", "a"], "--seeds"),
                       (["--tiny", "--hidden", "30"], "--heads"),
                       (["--from-json", str(tmp_path / "missing.json")], "missing.json")):
        assert q.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and word in err, err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"benchmark": "lm_quality", "rows": [{"arm": "dense"}]}))
    assert q.main(["--from-json", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unexpected content" in err, err
    with pytest.raises(SystemExit) as e:
        q.main(["--tiny", "--tokens", "lots"])
    assert e.value.code == 2 and "--tokens" in capsys.readouterr().err


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["amp", "bf16"])
def test_tiny_run_on_cuda(q, tmp_path, dtype):
    """Every arm through the Triton kernels: the preflight and a short run, finite and
    learning (run this before the full study)."""
    path = tmp_path / "c.json"
    assert q.main(["--tiny", "--device", "cuda", "--dtype", dtype, "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [r["arm"] for r in rows] == ["dense", "omnimoe", "peer", "moe"]
    for r in rows:
        assert 0 < r["val_bpb"] < r["curve"][0][2] < 8 and r["peak_mem_GiB"] > 0, r
