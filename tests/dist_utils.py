"""Run a function on several CPU processes (gloo) for the torch.distributed tests.

``run_ranks(fn, world, *args)`` spawns ``world`` processes, each calling
``fn(rank, world, *args)`` inside an initialised process group (gloo; nccl with
rank r on cuda:r), and returns what
each returned (through files, so tensors come back intact).  Waiting is bounded: a hung
collective fails the test instead of hanging CI.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

JOIN_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, outdir, fn, args, backend):
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        res = fn(rank, world, *args)
        torch.save({"ok": True, "result": res}, os.path.join(outdir, f"{rank}.pt"))
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, os.path.join(outdir, f"{rank}.pt"))
        raise
    finally:
        if dist.is_initialized():   # the function may have destroyed it itself
            dist.destroy_process_group()


def run_ranks(fn, world, *args, backend="gloo"):
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(_entry, args=(world, free_port(), outdir, fn, args, backend), nprocs=world,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        try:
            while not ctx.join(timeout=2):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"ranks still running after {JOIN_TIMEOUT_S} s")
        except (mp.ProcessRaisedException, mp.ProcessExitedException):
            pass  # the rank's own file says why; the others may wait in a collective
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        results = []
        for r in range(world):
            path = os.path.join(outdir, f"{r}.pt")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {r} returned nothing (crashed or timed out)")
            got = torch.load(path, weights_only=False)
            if not got["ok"]:
                raise RuntimeError(f"rank {r} failed:\n{got['error']}")
            results.append(got["result"])
        return results
