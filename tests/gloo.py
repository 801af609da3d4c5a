"""Run a function in several CPU processes that form a Gloo process group (the tests' stand-in
for several GPUs)."""
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results[rank] = fn(rank, *args)
    finally:
        dist.destroy_process_group()


def run_gloo(fn, world, *args):
    """``[fn(rank, *args) for rank in range(world)]``, each in its own process of one Gloo group
    (``fn`` must be importable by name: a module-level function)."""
    results = mp.Manager().dict()
    mp.spawn(_entry, args=(world, free_port(), fn, args, results), nprocs=world, join=True)
    return [results[r] for r in range(world)]
