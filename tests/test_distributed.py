"""Ranking across processes (MODEL.CLS_LOSS.RANK_ACROSS_PROCESSES) is exact.

Two CPU processes with the Gloo backend each hold half of a fixed batch; their loss must equal
the single-process loss on the whole batch, and each process's gradient the matching slice of
the single-process gradient (float64, 1e-9).
"""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ap_loss_d2 import ap_loss, auc_loss

CASES = [
    ("ap", dict(step="linear", interpolate=True)),
    ("ap", dict(step="heaviside", interpolate=False)),
    ("ap", dict(step="sigmoid", interpolate=True)),
    ("auc", dict(step="linear")),
]


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 300, 5, generator=g, dtype=torch.float64) * 2
    targets = torch.zeros(4, 300, 5, dtype=torch.int8)
    targets[torch.rand(4, 300, 5, generator=g) < 0.02] = 1
    targets[torch.rand(4, 300, 5, generator=g) < 0.05] = -1
    targets[3] = torch.where(targets[3] == 1, torch.zeros_like(targets[3]), targets[3])  # an image without positives
    logits[0, :10] = torch.round(logits[0, :10])  # ties across processes
    return logits, targets


def _loss(kind, x, t, **kw):
    return (ap_loss if kind == "ap" else auc_loss)(x, t, **kw)


def _worker(rank, world, port, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        logits, targets = _batch()
        per = logits.shape[0] // world
        mine = slice(rank * per, (rank + 1) * per)
        out = []
        for kind, kw in CASES:
            x = logits[mine].clone().requires_grad_()
            stats = {}
            loss = _loss(kind, x, targets[mine], process_group=dist.group.WORLD, stats=stats, **kw)
            loss.backward()
            out.append((loss.item(), x.grad, stats))
        results[rank] = out
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # launches processes
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_processes_equal_one_process():
    world = 2
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(world, _free_port(), results), nprocs=world, join=True)

    logits, targets = _batch()
    per = logits.shape[0] // world
    for c, (kind, kw) in enumerate(CASES):
        x = logits.clone().requires_grad_()
        stats = {}
        loss = _loss(kind, x, targets, stats=stats, **kw)
        loss.backward()
        for rank in range(world):
            r_loss, r_grad, r_stats = results[rank][c]
            assert r_loss == pytest.approx(loss.item(), rel=1e-9, abs=1e-12), (kind, kw, rank)
            torch.testing.assert_close(r_grad, x.grad[rank * per : (rank + 1) * per], rtol=1e-9, atol=1e-12)
            assert r_stats["num_pos"] == stats["num_pos"]
            assert r_stats["num_neg_nontrivial"] == stats["num_neg_nontrivial"]
        # the loss value is identical on every rank
        assert results[0][c][0] == results[1][c][0]


def test_single_process_group_is_noop():
    logits, targets = _batch()
    a = ap_loss(logits, targets)
    b = ap_loss(logits, targets, process_group=None)
    assert a.item() == b.item()
