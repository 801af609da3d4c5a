"""SafeDetectionCheckpointer: atomic saves, no code execution when loading weights."""
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from ap_loss_d2.engine.checkpoint import (
    SafeDetectionCheckpointer,
    UnsafeCheckpointError,
    load_options_supported,
)


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


# Loading options in the path (``model.pth?matching_heuristics=True``): Detectron2 main after v0.6.
OPTIONS = load_options_supported()
needs_options = pytest.mark.skipif(
    not OPTIONS, reason="this Detectron2's DetectionCheckpointer does not parse ?key=value options "
    "(v0.6); they exist on the main branch"
)


class _Wrapped(nn.Module):
    """Same layers as _model(), one level deeper: names differ from a bare Sequential's."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.body = _model()


def _bare_checkpoint(tmp_path):
    """A .pth whose keys ("0.weight", ...) only match _Wrapped ("body.0.weight") by heuristics."""
    weights = {k: torch.full_like(v, i + 0.5) for i, (k, v) in enumerate(_model().state_dict().items())}
    path = tmp_path / "bare.pth"
    torch.save({"model": weights}, path)
    return path, weights


@needs_options
def test_matching_heuristics_option_as_detectron2(tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer

    path, weights = _bare_checkpoint(tmp_path)
    plain = _Wrapped()
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    SafeDetectionCheckpointer(plain).load(str(path))  # no heuristics: no key matches
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(v, before[k])

    ours, stock = _Wrapped(), _Wrapped()
    SafeDetectionCheckpointer(ours).load(f"{path}?matching_heuristics=True")
    DetectionCheckpointer(stock).load(f"{path}?matching_heuristics=True")
    for k, v in weights.items():
        torch.testing.assert_close(ours.state_dict()[f"body.{k}"], v)
    for k, v in stock.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v)

    same = _Wrapped()
    SafeDetectionCheckpointer(same).load(f"{path}?matching_heuristics=False")
    for k, v in same.state_dict().items():
        torch.testing.assert_close(v, before[k])


@needs_options
def test_options_keep_weights_only_loading(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "x": _Evil(str(marker))}, path)
    with pytest.raises(UnsafeCheckpointError, match="evil.pth"):
        SafeDetectionCheckpointer(_model()).load(f"{path}?matching_heuristics=True")
    assert not marker.exists()


@needs_options
def test_bad_option_value_is_rejected(tmp_path):
    path, _ = _bare_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="matching_heuristics=True or False"):
        SafeDetectionCheckpointer(_Wrapped()).load(f"{path}?matching_heuristics=yes")


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_unknown_option_is_rejected(tmp_path, suffix):
    path = tmp_path / f"m{suffix}"
    if suffix == ".pth":
        torch.save({"model": _model().state_dict()}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump({"model": {k: v.numpy() for k, v in _model().state_dict().items()},
                         "__author__": "test"}, f)
    with pytest.raises(ValueError, match="bogus") as e:
        SafeDetectionCheckpointer(_model()).load(f"{path}?bogus=1")
    if OPTIONS:
        assert "supported: matching_heuristics=True|False" in str(e.value)
    else:
        assert "main branch" in str(e.value)


@pytest.mark.skipif(OPTIONS, reason="this Detectron2 parses loading options")
def test_options_without_detectron2_support_fail_clearly(tmp_path):
    path, _ = _bare_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="need a Detectron2 whose DetectionCheckpointer parses them"):
        SafeDetectionCheckpointer(_Wrapped()).load(f"{path}?matching_heuristics=True")
