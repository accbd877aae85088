"""The ``omni-moe`` command (also ``python -m omni_moe``).

    omni-moe bench router [...]   router forward/backward, every implementation
    omni-moe bench layer [...]    the whole OmniMoE layer
    omni-moe --version
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

LAYER_MODULE = "omni_moe.bench.layer"


def build_parser() -> argparse.ArgumentParser:
    from .bench import router

    p = argparse.ArgumentParser(prog="omni-moe", description="omni-moe: exact, fast OmniMoE kernels.")
    p.add_argument("--version", action="version", version=f"omni-moe {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    bench = sub.add_parser("bench", help="run a benchmark", description="Run a benchmark.")
    what = bench.add_subparsers(dest="bench", metavar="WHAT", required=True)
    r = what.add_parser(
        "router", help="the omni router, forward and backward, every implementation",
        description=router.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    router.add_arguments(r)
    # The layer benchmark's options belong to its module, imported only when asked for.
    what.add_parser("layer", help="the whole OmniMoE layer (see 'omni-moe bench layer -h')",
                    add_help=False)
    return p


def _bench_layer(extra) -> int:
    try:
        layer = importlib.import_module(LAYER_MODULE)
    except ImportError as e:
        print(f"omni-moe bench layer: the layer benchmark is not available: {LAYER_MODULE} "
              f"could not be imported ({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    p = argparse.ArgumentParser(prog="omni-moe bench layer", description=layer.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    layer.add_arguments(p)
    rc = layer.run(p.parse_args(extra))
    return int(rc or 0)


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench" and args.bench == "layer":
        return _bench_layer(extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from .bench import router

    return int(router.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
