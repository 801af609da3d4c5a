"""The ranking kernels every oracle test runs on (``ap_loss_d2.losses.ranking``: "grid", the
CPU kernel with host reads, and "sync_free", the one used on accelerators and under
torch.compile). Import the fixture into a test module (``from tests.kernels import kernel  #
noqa: F401``) and pass its value as ``kernel=`` to ``ap_loss``/``auc_loss``."""
import pytest

KERNELS = ("grid", "sync_free")


@pytest.fixture(params=KERNELS)
def kernel(request):
    """The name of each kernel in turn. The sigmoid step has one implementation (whatever the
    kernel): its sync-free twin is skipped."""
    callspec = getattr(request.node, "callspec", None)
    if request.param == "sync_free" and callspec and callspec.params.get("step") == "sigmoid":
        pytest.skip("the sigmoid step has one implementation (run with the grid kernel)")
    return request.param
