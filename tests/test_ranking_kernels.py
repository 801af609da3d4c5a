"""The synchronisation-free ranking kernel ("sync_free", issues 23 and 26): it compiles with
``torch.compile(fullgraph=True)`` (a data-dependent host read would break the graph) and gives
the oracle's values; CUDA twins run it under ``torch.cuda.set_sync_debug_mode("error")`` and in
a CUDA graph. Also: which kernel runs when, invalid values without a host read, and the option
checks shared with the loss modules."""
import math

import numpy as np
import pytest
import torch

from ap_loss_d2.losses.ranking import NonFiniteLogitsError, ap_loss, auc_loss, check_ranking_options
from tests.ap_oracle import ap_oracle, auc_oracle
from tests.params import slow_except

FNS = {"ap": (ap_loss, ap_oracle), "auc": (auc_loss, auc_oracle)}
PIECEWISE = ("linear", "heaviside")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")


def _case(shape=(2, 40, 5), seed=3, n_pos=20, n_ign=10):
    """Random float64 scores with ties and exact +-delta gaps (multiples of 1/4), labels."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    s = np.where(rng.random(n) < 0.3, rng.integers(-8, 9, n) / 4.0, rng.normal(0, 1.5, n))
    t = np.zeros(n, dtype=np.int64)
    t[rng.choice(n, n_pos + n_ign, replace=False)] = 1
    t[np.flatnonzero(t)[:n_ign]] = -1
    return s.reshape(shape), t.reshape(shape)


def _oracle(kind, s, t, step, delta):
    _, oracle = FNS[kind]
    kw = {} if kind == "auc" else {"interpolate": True}
    return oracle(s, t, delta=delta, step=step, details=True, **kw)


def _compiled_matches_oracle(kind, step, backend):
    fn, _ = FNS[kind]
    s, t = _case()
    delta = 0.5

    def loss_and_counts(x, targets):
        stats = {}
        loss = fn(x * 1.0, targets, delta=delta, step=step, stats=stats)
        return loss, stats["num_pos"], stats["num_neg_nontrivial"]

    compiled = torch.compile(loss_and_counts, fullgraph=True, backend=backend)
    x = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    loss, n_pos, n_neg = compiled(x, torch.as_tensor(t))
    loss.backward()
    exp_loss, exp_grad, info = _oracle(kind, s, t, step, delta)
    np.testing.assert_allclose(float(loss), exp_loss, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(x.grad.numpy(), exp_grad, rtol=1e-9, atol=1e-12)
    # compiled: the counts stay tensors (reading them would be a host synchronisation)
    assert isinstance(n_pos, torch.Tensor) and isinstance(n_neg, torch.Tensor)
    assert int(n_pos) == info["num_pos"] and int(n_neg) == info["num_neg_nontrivial"]


@pytest.mark.parametrize("step", slow_except(PIECEWISE, fast=("linear",)))
@pytest.mark.parametrize("kind", slow_except(["ap", "auc"], fast=("ap",)))
def test_compile_fullgraph_aot_eager_matches_oracle(kind, step):
    _compiled_matches_oracle(kind, step, "aot_eager")


@pytest.mark.slow  # inductor compiles C++ (~20 s a variant on one core)
@pytest.mark.parametrize("step", PIECEWISE)
@pytest.mark.parametrize("kind", ["ap", "auc"])
def test_compile_fullgraph_inductor_matches_oracle(kind, step):
    _compiled_matches_oracle(kind, step, "inductor")


def test_kernel_choice_on_cpu():
    """CPU eager: the grid kernel (its validation read names the problem); the sync-free
    kernel, forced, makes no host read: invalid values give NaN loss and gradients instead."""
    t = torch.tensor([1, 0, 0, -1, 1, 0])
    x = torch.tensor([0.5, float("nan"), 1.0, 0.0, 2.0, -1.0], requires_grad=True)
    with pytest.raises(NonFiniteLogitsError, match=r"\b1 of 6\b"):
        ap_loss(x, t)
    for fn, _ in FNS.values():
        for logits, labels in ((x, t), (x.detach().nan_to_num().requires_grad_(),
                                        torch.tensor([1, 0, 2, -1, 1, 0])),
                               (x.detach().nan_to_num().requires_grad_(),
                                torch.tensor([1.0, 0.0, 0.5, -1.0, 1.0, 0.0]))):
            loss = fn(logits, labels, kernel="sync_free")
            loss.backward()
            assert math.isnan(float(loss)) and logits.grad.isnan().all()
        with pytest.raises(ValueError, match="auto.*grid.*sync_free"):
            fn(x, t, kernel="gpu")
    # the sigmoid step has one implementation: it still validates on the host
    with pytest.raises(NonFiniteLogitsError):
        ap_loss(torch.full((4,), math.inf), torch.tensor([1, 0, 0, 1]), step="sigmoid",
                kernel="sync_free")


def _positives_case(n=4000, n_pos=300, seed=7):
    g = torch.Generator().manual_seed(seed)
    t = torch.zeros(n, dtype=torch.int8)
    t[torch.randperm(n, generator=g)[:n_pos]] = 1
    return torch.randn(n, generator=g, dtype=torch.float64), t


@pytest.mark.parametrize("kind", ["ap", "auc"])
def test_sync_free_bound_on_positives(kind):
    """max_positives is the sync-free kernel's static bound: exact up to it; beyond it a
    ValueError naming the bound and the fixes on the CPU, NaN (no host read) when compiled."""
    fn, _ = FNS[kind]
    x, t = _positives_case()
    ref = fn(x, t, kernel="grid")
    assert float(fn(x, t, kernel="sync_free", max_positives=300)) == pytest.approx(
        float(ref), rel=1e-12)
    with pytest.raises(ValueError, match=r"300 positives exceed.*max_positives=299.*"
                                         r"max_positives=300 or more.*kernel='grid'"):
        fn(x, t, kernel="sync_free", max_positives=299)
    if kind == "ap":  # one compilation is enough (the fast suite stays cheap)
        compiled = torch.compile(lambda a, b: fn(a * 1.0, b, max_positives=299),
                                 fullgraph=True, backend="aot_eager")
        assert math.isnan(float(compiled(x, t)))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_positives must be an integer >= 1"):
            fn(x, t, max_positives=bad)


@pytest.mark.parametrize("kernel", ["grid", "sync_free"])
def test_memory_kept_for_backward(kernel):
    """Between forward and backward each kernel keeps the logits (no copy), 4 bytes per entry
    (the int32 segment) and tables of O(|P|) (here, O(n) for the sync-free kernel's bound)."""
    x, t = _positives_case(n=200_000, n_pos=50)
    x = x.float().requires_grad_(True)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = ap_loss(x, t, kernel=kernel, max_positives=64)
    extra = sum(s.numel() * s.element_size() for s in saved if s.data_ptr() != x.data_ptr())
    assert extra <= 4 * x.numel() + 64 * 1024, extra
    loss.backward()
    ref = x.detach().clone().requires_grad_(True)
    ap_loss(ref, t, kernel="grid").backward()
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-6, atol=1e-9)


def test_sync_free_kernel_autograd_contract():
    s, t = _case(seed=6)
    t = torch.as_tensor(t)
    x = torch.tensor(s, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(ap_loss(x, t, kernel="sync_free"), x, create_graph=True)
    with pytest.raises(RuntimeError, match="vmap"):
        torch.func.vmap(lambda a, b: ap_loss(a, b, kernel="sync_free"))(x.detach(), t)
    with torch.no_grad():
        value = ap_loss(x, t, kernel="sync_free")
    assert value.grad_fn is None
    exp_loss, _, _ = _oracle("ap", s, t.numpy(), "linear", 1.0)
    np.testing.assert_allclose(float(value), exp_loss, rtol=1e-9)


def test_check_ranking_options():
    ok = dict(delta=1.0, step="linear", sigmoid_k=0.5)
    check_ranking_options(**ok)
    check_ranking_options(delta=2, step="heaviside", sigmoid_k=np.float64(1.5), interpolate=False)
    for key, value, error, words in (
        ("delta", 0.0, ValueError, "delta must be a finite number > 0"),
        ("delta", -1, ValueError, "delta must be"),
        ("delta", math.inf, ValueError, "delta must be"),
        ("delta", math.nan, ValueError, "delta must be"),
        ("delta", "1", TypeError, "delta must be a Python number"),
        ("delta", True, TypeError, "delta must be a Python number"),
        ("sigmoid_k", 0, ValueError, "sigmoid_k must be a finite number > 0"),
        ("step", "relu", ValueError, "linear.*heaviside.*sigmoid"),
        ("interpolate", "no", TypeError, "interpolate must be True or False"),
        ("interpolate", 1, TypeError, "interpolate must be True or False"),
    ):
        with pytest.raises(error, match=words):
            check_ranking_options(**{**ok, key: value})
    x, t = torch.randn(6), torch.tensor([1, 0, 0, 1, 0, -1])
    with pytest.raises(TypeError, match="interpolate must be True or False"):
        ap_loss(x, t, interpolate="no")
    with pytest.raises(ValueError, match="delta must be"):
        auc_loss(x, t, delta=0)


# ---------------------------------------------------------------------------------------------
# CUDA: no synchronisation, graph capture
# ---------------------------------------------------------------------------------------------
def _cuda_case(seed=0):
    s, t = _case(shape=(2, 3000, 20), seed=seed, n_pos=300, n_ign=500)
    return torch.tensor(s, dtype=torch.float32), torch.as_tensor(t, dtype=torch.int8)


def _cpu_reference(fn, x, t, step):
    ref = x.clone().requires_grad_(True)
    stats = {}
    loss = fn(ref, t, step=step, stats=stats, kernel="grid")
    loss.backward()
    return loss.detach(), ref.grad, stats


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("step", PIECEWISE)
@pytest.mark.parametrize("kind", ["ap", "auc"])
def test_cuda_no_host_synchronisation(kind, step):
    fn, _ = FNS[kind]
    x_cpu, t_cpu = _cuda_case()
    x = x_cpu.cuda().requires_grad_(True)
    t = t_cpu.cuda()
    fn(x, t, step=step).backward()  # first call: lazy CUDA initialisation may synchronise
    x.grad = None
    stats = {}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = fn(x, t, step=step, stats=stats)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref_loss, ref_grad, ref_stats = _cpu_reference(fn, x_cpu, t_cpu, step)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad.cpu(), ref_grad, rtol=1e-5,
                               atol=1e-6 * float(ref_grad.abs().max()))
    assert isinstance(stats["num_pos"], torch.Tensor) and stats["num_pos"].is_cuda
    assert int(stats["num_pos"]) == ref_stats["num_pos"]
    assert int(stats["num_neg_nontrivial"]) == ref_stats["num_neg_nontrivial"]


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("step", PIECEWISE)
@pytest.mark.parametrize("kind", ["ap", "auc"])
def test_cuda_graph_capture(kind, step):
    fn, _ = FNS[kind]
    x_cpu, t_cpu = _cuda_case(seed=1)
    x = x_cpu.cuda().requires_grad_(True)
    t = t_cpu.cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs asks
        for _ in range(2):
            x.grad = None
            fn(x, t, step=step).backward()
    torch.cuda.current_stream().wait_stream(side)
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = fn(x, t, step=step)
        loss.backward()
    for seed in (2, 3):  # new values in the captured buffers, then replay
        x_new, t_new = _cuda_case(seed=seed)
        with torch.no_grad():
            x.copy_(x_new.cuda())
        t.copy_(t_new.cuda())
        graph.replay()
        torch.cuda.synchronize()
        ref_loss, ref_grad, _ = _cpu_reference(fn, x_new, t_new, step)
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(x.grad.cpu(), ref_grad, rtol=1e-5,
                                   atol=1e-6 * float(ref_grad.abs().max()))
