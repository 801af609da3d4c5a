"""float16 loss scaling (issue 10.3): the ranking losses compute the gradient and multiply it by
``grad_output`` (the loss scale) in float32, and only then cast to float16. So the scaled float16
gradient equals the float32 gradient times the scale, rounded once to float16: no entry zeroed,
inf or NaN where that value is a finite non-zero float16. No Detectron2 needed."""
import functools

import pytest
import torch

from ap_loss_d2.losses import ap_loss, auc_loss
from tests.kernels import kernel  # noqa: F401  (the fixture)

FNS = {"ap": ap_loss, "auc": auc_loss}


def _case(n=200_000, n_pos=400, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 2
    t = torch.zeros(n, dtype=torch.int8)
    t[torch.randperm(n, generator=g)[:n_pos]] = 1
    t[torch.randperm(n, generator=g)[: n // 100]] = -1
    return x.half().to(device), t.to(device)


def _check_scaled(g16, g32, scale):
    """g16: float16 gradient at loss scale ``scale``; g32: float32 gradient at scale 1."""
    expected = (g32.double() * scale).to(torch.float16)  # one rounding to float16
    assert torch.isfinite(g16).all(), "inf/NaN in the scaled float16 gradient"
    representable = (expected != 0) & torch.isfinite(expected)
    assert not (representable & (g16 == 0)).any(), "gradients zeroed by the cast"
    # equal up to float16 rounding of the final value (1 ulp, or the subnormal step)
    torch.testing.assert_close(g16.float(), expected.float(), rtol=2**-10, atol=2**-24)


@pytest.mark.parametrize("kind", ["ap", "auc"])
@pytest.mark.parametrize("scale", [1024.0, 32768.0, 65536.0])
def test_float16_backward_with_loss_scale(kind, scale, kernel):
    fn = functools.partial(FNS[kind], kernel=kernel)
    x16, t = _case()
    x16.requires_grad_(True)
    x32 = x16.detach().float().requires_grad_(True)
    loss16 = fn(x16, t)
    loss32 = fn(x32, t)
    assert loss16.dtype == torch.float32  # half-precision logits: float32 loss value
    assert float(loss16) == pytest.approx(float(loss32), rel=1e-6)
    loss16.backward(torch.tensor(scale))
    loss32.backward()
    assert x16.grad.dtype == torch.float16
    _check_scaled(x16.grad, x32.grad, scale)
    # the small gradients exist: at scale 1 many of them are below float16's range
    tiny = (x32.grad != 0) & (x32.grad.abs() < 2**-24)
    assert tiny.any(), "the case should hold gradients that underflow float16 unscaled"


@pytest.mark.parametrize("kind", ["ap", "auc"])
def test_gradscaler_cpu_default_scale(kind, kernel):
    if not hasattr(torch.amp, "GradScaler"):
        pytest.skip("torch.amp.GradScaler not available")
    fn = functools.partial(FNS[kind], kernel=kernel)
    torch.manual_seed(0)
    feats = torch.randn(20_000, 8)
    t = torch.zeros(20_000, dtype=torch.long)
    t[:100] = 1
    w = torch.nn.Parameter(torch.randn(8, 1) * 0.5)
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scale0 = scaler.get_scale()
    assert scale0 == 65536.0
    logits16 = (feats @ w).squeeze(1).half()  # float16 logits, as autocast gives them
    logits16.retain_grad()
    scaler.scale(fn(logits16, t)).backward()
    # the scaled logit gradient is the float32 one times the scale, rounded once
    ref = logits16.detach().float().requires_grad_(True)
    fn(ref, t).backward()
    _check_scaled(logits16.grad, ref.grad, scale0)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == scale0, "GradScaler found inf/NaN and skipped the step"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("kind", ["ap", "auc"])
def test_cuda_autocast_float16_gradscaler(kind):
    fn = FNS[kind]
    torch.manual_seed(0)
    feats = torch.randn(200_000, 16, device="cuda")
    t = torch.zeros(200_000, dtype=torch.long, device="cuda")
    t[torch.randperm(200_000, device="cuda")[:400]] = 1
    lin = torch.nn.Linear(16, 1).cuda()
    scaler = torch.amp.GradScaler("cuda") if hasattr(torch.amp, "GradScaler") else \
        torch.cuda.amp.GradScaler()
    with torch.autocast("cuda", dtype=torch.float16):
        logits = lin(feats).squeeze(1)
    assert logits.dtype == torch.float16
    logits.retain_grad()
    loss = fn(logits, t)
    assert loss.dtype == torch.float32
    scaler.scale(loss).backward()
    ref = logits.detach().float().requires_grad_(True)
    fn(ref, t).backward()
    _check_scaled(logits.grad, ref.grad, scaler.get_scale())
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    scale0 = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == scale0
