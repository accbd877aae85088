"""The ``omni-moe`` command (also ``python -m omni_moe``).

    omni-moe bench router [...]   the omni router alone, forward and backward, every implementation
    omni-moe bench layer [...]    the whole OmniMoE layer, its parts and its PyTorch peers
    omni-moe bench decode [...]   the layer serving (decode and prefill steps) beside dense MLPs
    omni-moe --version

Bad arguments and unreadable or unwritable files are reported in one line on stderr,
exit status 2, before any work.  A benchmark run first prints the CPU threads it uses
and warns (stderr) when they oversubscribe the machine (``bench.common.cpu_threads``).
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .bench import common
from .bench.common import ArgumentParser, UsageError


def build_parser() -> argparse.ArgumentParser:
    from .bench import decode, layer, router

    p = ArgumentParser(prog="omni-moe", description="omni-moe: exact, fast OmniMoE kernels.")
    p.add_argument("--version", action="version", version=f"omni-moe {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    bench = sub.add_parser("bench", help="run a benchmark", description="Run a benchmark.")
    what = bench.add_subparsers(dest="bench", metavar="WHAT", required=True)
    for name, module, text in (
            ("router", router, "the omni router alone, forward and backward, every implementation"),
            ("layer", layer, "the whole OmniMoE layer, its parts and its PyTorch peers"),
            ("decode", decode, "the layer serving (decode and prefill steps) beside dense MLPs")):
        q = what.add_parser(name, help=text, description=module.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(q)
        q.set_defaults(run=module.run, check=getattr(module, "check_arguments", common.check_run_arguments))
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    prog = f"omni-moe {args.command} {args.bench}"
    try:
        args.check(args)  # every usage error before any output
        if not args.from_json:
            common.report_threads(prog)
        return int(args.run(args) or 0)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
