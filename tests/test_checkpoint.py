"""SafeDetectionCheckpointer: atomic saves, no code execution when loading weights, resume
fallback by iteration, loading options; fine-tuning across class counts as Detectron2."""
import errno
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from detectron2.checkpoint import DetectionCheckpointer

from ap_loss_d2.engine.checkpoint import SafeDetectionCheckpointer, UnsafeCheckpointError
from tests.bad_input import warning_lines


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


def test_disk_full_leaves_no_tmp_and_keeps_previous(tmp_path, monkeypatch):
    model = _model()
    ck = SafeDetectionCheckpointer(model, str(tmp_path))
    ck.save("model_0000009", iteration=9)
    good = (tmp_path / "model_0000009.pth").read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    for name in ("model_0000019", "model_0000009"):
        with pytest.raises(OSError, match="No space left"):
            ck.save(name, iteration=19)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000009.pth"]
    assert (tmp_path / "model_0000009.pth").read_bytes() == good


def test_resume_falls_back_by_iteration_not_file_time(tmp_path):
    """A run folder copied with ``cp -r`` (file times no longer in iteration order) whose newest
    checkpoint is truncated: --resume takes the intact checkpoint with the highest iteration."""
    models = {}
    for it in (9, 19, 29, 39):
        models[it] = _model()
        with torch.no_grad():
            models[it][0].bias.fill_(it)
        SafeDetectionCheckpointer(models[it], str(tmp_path)).save(f"model_{it:07d}", iteration=it)
    newest = tmp_path / "model_0000039.pth"
    newest.write_bytes(newest.read_bytes()[:500])
    # file times: 19 newest, then 39, 9, 29 oldest
    for age, it in enumerate((19, 39, 9, 29)):
        os.utime(tmp_path / f"model_{it:07d}.pth", (1e9 - age * 1000, 1e9 - age * 1000))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    model = _model()
    extra = SafeDetectionCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)
    assert extra["iteration"] == 29
    torch.testing.assert_close(model[0].bias, models[29][0].bias)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing deleted


def test_pth_with_numpy_arrays_is_refused_with_a_hint(tmp_path):
    torch.save({"model": {k: v.numpy() for k, v in _model().state_dict().items()}}, tmp_path / "np.pth")
    with pytest.raises(UnsafeCheckpointError, match=r"np\.pth is not a weights-only.*name the file \.pkl"):
        SafeDetectionCheckpointer(_model()).load(str(tmp_path / "np.pth"))


# Loading options in the path (``model.pth?matching_heuristics=True``), as Detectron2's main
# branch parses them; here on every Detectron2 and file type.
STOCK_OPTIONS = hasattr(DetectionCheckpointer(nn.Module()), "_parsed_url_during_load")


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


def test_matching_heuristics_option(tmp_path):
    path, weights = _bare_checkpoint(tmp_path)
    plain = _Wrapped()
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    SafeDetectionCheckpointer(plain).load(str(path))  # no heuristics: no key matches
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(v, before[k])

    ours = _Wrapped()
    SafeDetectionCheckpointer(ours).load(f"{path}?matching_heuristics=True")
    for k, v in weights.items():
        torch.testing.assert_close(ours.state_dict()[f"body.{k}"], v)
    if STOCK_OPTIONS:
        stock = _Wrapped()
        DetectionCheckpointer(stock).load(f"{path}?matching_heuristics=True")
        for k, v in stock.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[k], v)

    same = _Wrapped()
    SafeDetectionCheckpointer(same).load(f"{path}?matching_heuristics=False")
    for k, v in same.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_options_keep_weights_only_loading(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "x": _Evil(str(marker))}, path)
    with pytest.raises(UnsafeCheckpointError, match="evil.pth"):
        SafeDetectionCheckpointer(_model()).load(f"{path}?matching_heuristics=True")
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_unknown_option_is_rejected(tmp_path, suffix):
    path = tmp_path / f"m{suffix}"
    if suffix == ".pth":
        torch.save({"model": _model().state_dict()}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump({"model": {k: v.numpy() for k, v in _model().state_dict().items()},
                         "__author__": "test"}, f)
    with pytest.raises(ValueError, match=r"loading option 'bogus=1' is not valid; supported: matching_heuristics=True\|False"):
        SafeDetectionCheckpointer(_model()).load(f"{path}?bogus=1")
    with pytest.raises(ValueError, match=r"loading option 'matching_heuristics=yes' is not valid; supported: matching_heuristics=True\|False"):
        SafeDetectionCheckpointer(_model()).load(f"{path}?matching_heuristics=yes")


@pytest.mark.slow  # builds two RetinaNets and trains one iteration
def test_finetune_3_class_retinanet_into_5_classes(synth_dataset_dir, tmp_path, one_thread):
    """MODEL.WEIGHTS from a 3-class RetinaNet into a 5-class one: the classifier is skipped with
    Detectron2's warning (the same warnings and weights as Detectron2's DetectionCheckpointer),
    everything else is loaded, and training runs."""
    from detectron2.checkpoint import DetectionCheckpointer as Stock

    from ap_loss_d2.engine import Trainer, get_ap_loss_cfg

    def cfg(*opts):
        c = get_ap_loss_cfg()
        c.merge_from_file("tests/configs/tiny_synth_retinanet.yaml")
        c.merge_from_list(["OUTPUT_DIR", str(tmp_path / "out"), "DATASETS.TEST", "()", "SOLVER.MAX_ITER", "1", *opts])
        return c

    source = Trainer.build_model(cfg())
    SafeDetectionCheckpointer(source, str(tmp_path / "src")).save("model_final", iteration=99)
    weights = str(tmp_path / "src" / "model_final.pth")
    five = cfg("MODEL.RETINANET.NUM_CLASSES", "5", "MODEL.WEIGHTS", weights)
    trainer = Trainer(five)

    logs = {}
    for name, load in (("ours", lambda: trainer.resume_or_load(resume=False)),
                       ("stock", lambda: Stock(stock_model).load(weights, checkpointables=[]))):
        stock_model = Trainer.build_model(five)
        with warning_lines("fvcore") as lines:
            load()
        logs[name] = lines
    skipped = [line for line in logs["ours"] if line.startswith("Skip loading parameter")]
    assert [line.split("'")[1] for line in skipped] == ["head.cls_score.weight", "head.cls_score.bias"]
    assert "(18, 16, 3, 3) in the checkpoint but (30, 16, 3, 3) in the model" in skipped[0]
    assert logs["ours"] == logs["stock"]
    ours = trainer.model.state_dict()
    for k, v in stock_model.state_dict().items():
        if not k.startswith("head.cls_score"):
            torch.testing.assert_close(ours[k], source.state_dict()[k])
            torch.testing.assert_close(ours[k], v)
    assert trainer.start_iter == 0
    trainer.train()
    assert (tmp_path / "out" / "model_final.pth").is_file()
    assert trainer.model.head.cls_score.out_channels == 30
