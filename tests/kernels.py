"""The ranking kernels every oracle test runs on (``ap_loss_d2.losses.ranking``: "grid", the
CPU kernel with host reads, and "sorted", the synchronisation-free one used on accelerators and
under torch.compile). Import the fixture into a test module: ``from tests.kernels import
kernel  # noqa: F401``."""
import pytest

from ap_loss_d2.losses.ranking import ranking_kernel

KERNELS = ("grid", "sorted")


@pytest.fixture(params=KERNELS)
def kernel(request):
    """Run the test with the ranking losses forced onto each kernel in turn."""
    with ranking_kernel(request.param):
        yield request.param
