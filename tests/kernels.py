"""The ranking kernels every oracle test runs on (``ap_loss_d2.losses.ranking``: "grid", the
CPU kernel with host reads, and "sorted", the synchronisation-free one used on accelerators and
under torch.compile). Import the fixture into a test module: ``from tests.kernels import
kernel  # noqa: F401``."""
import pytest

from ap_loss_d2.losses.ranking import ranking_kernel

KERNELS = ("grid", "sorted")


@pytest.fixture(params=KERNELS)
def kernel(request):
    """Run the test with the ranking losses forced onto each kernel in turn. The sigmoid step
    has one implementation (whatever the kernel): its sorted twin is skipped."""
    callspec = getattr(request.node, "callspec", None)
    if request.param == "sorted" and callspec and callspec.params.get("step") == "sigmoid":
        pytest.skip("the sigmoid step has one implementation (run with the grid kernel)")
    with ranking_kernel(request.param):
        yield request.param
