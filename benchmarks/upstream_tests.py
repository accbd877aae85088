"""Run the public upstream omni-moe package's own test files against this package.

On a CUDA machine, from the repository root:

    PYTHONPATH=. python benchmarks/upstream_tests.py UPSTREAM [--commit SHA] [-- PYTEST_ARGS...]

UPSTREAM is a checkout of github.com/HKUSTDial/omni-moe (formerly flash-algo/omni-moe),
or any folder holding its ``tests/`` (``git archive <commit> tests | tar -x -C DIR``
gives one without upstream's package).  pytest runs those files with this checkout's
``omni_moe`` first on the path (checked before the run), upstream's ``testing.py``
beside them and neither repository's pytest configuration; upstream's own package is
never imported.  ``--commit`` records which upstream version the files are from (read
from the checkout when it is a git repository).

Upstream's tests are throughput benchmarks of its Triton functions beside a PyTorch
baseline.  Where they compare the two (``validate=True``: the router's forward) a
mismatch is printed, not raised; this script counts such lines as failures.

Exit status: 0 when every test passed and none printed a mismatch; 1 otherwise; 2 for a
bad argument or when no test ran (without CUDA upstream's tests all skip).  Writes
$OUT/upstream_tests.json (default ./out): the counts, the mismatches with their test,
the upstream path and commit, and the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # import this checkout's omni_moe, installed or not

MISMATCH = "[validate] output mismatch"     # what upstream's testing.run_benchmarks prints
TEST_ID = re.compile(r"^(\S+\.py::\S+)")    # pytest -v starts a test's output with its id


def _error(msg: str) -> int:
    print(f"upstream_tests.py: error: {msg}", file=sys.stderr)
    return 2


def _tests_dir(path: str) -> str | None:
    for d in (os.path.join(path, "tests"), path):
        if os.path.isdir(d) and any(f.startswith("test_") and f.endswith(".py") for f in os.listdir(d)):
            return os.path.abspath(d)
    return None


def _git_commit(path: str) -> str | None:
    proc = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def _counts(junit_xml: str) -> dict:
    root = ET.parse(junit_xml).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    keys = ("tests", "failures", "errors", "skipped")
    c = {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}
    c["passed"] = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
    return c


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="Arguments after -- go to pytest.")
    ap.add_argument("upstream", help="a checkout of upstream omni-moe, or a folder with its tests/")
    ap.add_argument("--commit", help="the upstream commit the files are from (default: the checkout's HEAD)")
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args, extra = ap.parse_args(argv[:cut]), argv[cut + 1:]     # after --: pytest's
    tests = _tests_dir(args.upstream)
    if tests is None:
        return _error(f"no test_*.py in {args.upstream!r} or its tests/ folder")
    commit = args.commit or _git_commit(args.upstream)

    # This checkout first: python -m puts the working directory (ROOT) on the path, and
    # PYTHONPATH comes before any installed copy, upstream's included.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    where = subprocess.run([sys.executable, "-c", "import omni_moe; print(omni_moe.__file__)"],
                           cwd=ROOT, env=env, capture_output=True, text=True)
    ours = os.path.realpath(os.path.join(ROOT, "omni_moe", "__init__.py"))
    if where.returncode != 0 or os.path.realpath(where.stdout.strip()) != ours:
        return _error(f"omni_moe imports from {where.stdout.strip() or where.stderr.strip()!r}, "
                      f"not from this checkout ({ours})")

    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        ini = os.path.join(tmp, "pytest.ini")
        with open(ini, "w") as f:
            f.write("[pytest]\n")
        report = os.path.join(tmp, "report.xml")
        cmd = [sys.executable, "-m", "pytest", "-c", ini, "--rootdir", tests, "--confcutdir", tests,
               "-p", "no:cacheprovider", "-v", "-s", "-rs", f"--junitxml={report}", tests, *extra]
        print("$ " + " ".join(cmd), flush=True)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            sys.stdout.write(line)
            lines.append(line)
        rc = proc.wait()
        if not os.path.exists(report):
            return _error(f"pytest wrote no report (exit status {rc})")
        counts = _counts(report)

    mismatches, test = [], None
    for line in lines:
        m = TEST_ID.match(line)
        test = m.group(1) if m else test
        if MISMATCH in line:
            mismatches.append({"test": test, "line": line.strip()})

    from omni_moe.bench.common import environment

    result = {"upstream": {"path": os.path.abspath(args.upstream), "commit": commit},
              "pytest_returncode": rc, "counts": counts, "mismatches": mismatches,
              "environment": environment()}
    out = os.environ.get("OUT", os.path.join(ROOT, "out"))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "upstream_tests.json"), "w") as f:
        json.dump(result, f, indent=1)
    c = counts
    print(f"\nupstream {commit or '(commit unknown)'}: {c['passed']} passed, {c['failures']} failed, "
          f"{c['errors']} errors, {c['skipped']} skipped; {len(mismatches)} validation mismatches")
    for m in mismatches:
        print(f"  mismatch in {m['test']}: {m['line']}")
    if c["tests"] == c["skipped"]:
        return _error("no upstream test ran (they need CUDA)")
    return 0 if rc == 0 and not mismatches and not (c["failures"] or c["errors"]) else 1


if __name__ == "__main__":
    sys.exit(main())
