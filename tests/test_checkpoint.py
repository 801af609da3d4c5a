"""SafeDetectionCheckpointer: atomic saves, no code execution when loading weights."""
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from ap_loss_d2.engine.checkpoint import SafeDetectionCheckpointer, UnsafeCheckpointError


class _Evil:
    """Unpickling this would create a marker file (stands for arbitrary code)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_save_then_load_roundtrip(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ck = SafeDetectionCheckpointer(model, str(tmp_path), optimizer=opt)
    ck.save("model_0000009", iteration=9)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    assert not list(tmp_path.glob("*.tmp"))

    other = _model()
    for p in other.parameters():
        nn.init.zeros_(p)
    extra = SafeDetectionCheckpointer(other, str(tmp_path)).resume_or_load("", resume=True)
    assert extra["iteration"] == 9
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = _model()
    ck = SafeDetectionCheckpointer(model, str(tmp_path))
    ck.save("model_0000009", iteration=9)
    good = (tmp_path / "model_0000009.pth").read_bytes()

    def dies_midway(obj, f, *args, **kwargs):
        f.write(b"truncated")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        ck.save("model_0000019", iteration=19)
    with pytest.raises(KeyboardInterrupt):
        ck.save("model_0000009", iteration=19)  # even when overwriting the same name
    monkeypatch.undo()

    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    assert not (tmp_path / "model_0000019.pth").exists()
    assert (tmp_path / "model_0000009.pth").read_bytes() == good
    extra = SafeDetectionCheckpointer(_model(), str(tmp_path)).resume_or_load("", resume=True)
    assert extra["iteration"] == 9


def test_pth_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "x": _Evil(str(marker))}, path)
    with pytest.raises(UnsafeCheckpointError, match="evil.pth"):
        SafeDetectionCheckpointer(_model()).load(str(path))
    assert not marker.exists()


def test_pkl_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": np.zeros(1)}, "__author__": "x", "x": _Evil(str(marker))}, f)
    with pytest.raises(UnsafeCheckpointError, match="evil.pkl"):
        SafeDetectionCheckpointer(_model()).load(str(path))
    assert not marker.exists()


def test_model_zoo_style_pkl_loads(tmp_path):
    model = _model()
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    path = tmp_path / "zoo.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": weights, "__author__": "test"}, f)
    other = _model()
    for p in other.parameters():
        nn.init.zeros_(p)
    SafeDetectionCheckpointer(other).load(str(path))
    for k, v in model.state_dict().items():
        np.testing.assert_allclose(other.state_dict()[k].numpy(), v.numpy())
    assert os.path.exists(path)
