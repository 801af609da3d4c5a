"""Multi-process launching on GPUs (Detectron2's ``launch``) and on CPUs (Gloo).

Detectron2 v0.6's ``launch`` requires CUDA for more than one process ("cuda is not
available"), and Detectron2's ``create_ddp_model`` passes ``device_ids=[local rank]``, which
``DistributedDataParallel`` rejects for CPU modules. :func:`launch` starts CPU processes with
the Gloo backend when CUDA is unavailable, and :func:`create_ddp_model_for` wraps CPU models
without ``device_ids``; on CUDA machines both are Detectron2's own.
"""
import logging
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detectron2.engine import create_ddp_model
from detectron2.engine import launch as d2_launch
from detectron2.utils import comm

__all__ = ["create_ddp_model_for", "launch"]

DEFAULT_TIMEOUT = timedelta(minutes=30)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    main_func,
    num_gpus_per_machine,
    num_machines=1,
    machine_rank=0,
    dist_url=None,
    args=(),
    timeout=DEFAULT_TIMEOUT,
):
    """Run ``main_func(*args)`` in ``num_machines * num_gpus_per_machine`` processes.

    Same arguments as Detectron2's ``launch``. With CUDA, or for at most one process (``--num-gpus
    0`` or 1 on one machine: ``main_func`` runs in this process), this is Detectron2's ``launch``.
    Without CUDA, ``num_gpus_per_machine`` CPU processes per machine are started with the Gloo
    backend (``dist_url="auto"`` picks a free local port).
    """
    world_size = num_machines * num_gpus_per_machine
    if world_size <= 1 or torch.cuda.is_available():
        return d2_launch(
            main_func,
            num_gpus_per_machine,
            num_machines=num_machines,
            machine_rank=machine_rank,
            dist_url=dist_url,
            args=args,
            timeout=timeout,
        )
    if not dist.is_available() or not dist.is_gloo_available():
        raise RuntimeError(
            f"{world_size} processes were asked for on a machine without CUDA, which needs "
            f"torch.distributed with the Gloo backend; this PyTorch build has none"
        )
    if dist_url is None or dist_url == "auto":
        if num_machines != 1:
            raise ValueError("--dist-url auto is only for one machine; give tcp://HOST:PORT")
        dist_url = f"tcp://127.0.0.1:{_free_port()}"
    logging.getLogger(__name__).info(
        f"No CUDA: starting {num_gpus_per_machine} CPU process(es) per machine with Gloo"
    )
    mp.spawn(
        _cpu_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
    )


def _cpu_worker(local_rank, main_func, world_size, per_machine, machine_rank, dist_url, args, timeout):
    rank = machine_rank * per_machine + local_rank
    dist.init_process_group(
        backend="gloo", init_method=dist_url, world_size=world_size, rank=rank, timeout=timeout
    )
    # Detectron2 main tracks the processes of this machine (comm.get_local_rank); v0.6 only
    # needs that for create_ddp_model's device_ids, which CPU models do not use.
    if hasattr(comm, "create_local_process_group"):
        comm.create_local_process_group(per_machine)
    comm.synchronize()
    main_func(*args)


def create_ddp_model_for(model, **kwargs):
    """Detectron2's ``create_ddp_model``, without ``device_ids`` for a model on CPU."""
    if comm.get_world_size() > 1 and all(p.device.type == "cpu" for p in model.parameters()):
        kwargs.setdefault("device_ids", None)
    return create_ddp_model(model, **kwargs)
