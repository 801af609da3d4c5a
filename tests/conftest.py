"""Shared test set-up.

The project's datasets are registered once, by ``ap_loss_d2.data.register_datasets()``, with the
cache root of the embedded ``synth_shapes_*`` sets read from ``$AP_LOSS_D2_DATASETS`` then.
Unless the caller set it, point it at a temporary folder for the whole session (before any test
module is imported) so that tests never write into the working tree; the default dataset is
generated there once.
"""
import importlib.util
import os
import shutil
import tempfile

import pytest

_session_dirs = []


def pytest_configure(config):
    if not os.environ.get("AP_LOSS_D2_DATASETS"):
        path = tempfile.mkdtemp(prefix="ap_loss_d2_test_datasets_")
        os.environ["AP_LOSS_D2_DATASETS"] = path
        _session_dirs.append(path)
    if importlib.util.find_spec("detectron2") is not None:
        from ap_loss_d2.data import register_datasets

        register_datasets()


def pytest_unconfigure(config):
    while _session_dirs:
        path = _session_dirs.pop()
        if os.environ.get("AP_LOSS_D2_DATASETS") == path:
            del os.environ["AP_LOSS_D2_DATASETS"]
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def synth_dataset_dir():
    """Folder of the default synthetic dataset (generated once per session), used by the
    registered ``synth_shapes_*`` names in this process and in subprocesses (same env)."""
    pytest.importorskip("detectron2")
    from ap_loss_d2.data import ensure_synthetic_dataset

    return ensure_synthetic_dataset()


@pytest.fixture
def one_thread():
    """Run the test with torch on one thread (the model tests are faster and steadier so on the
    shared 2-core machines), restoring the previous count afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
