"""Bad inputs of the VGG-16 converter (issue 28 items 2, 5, 13), in the ``(id, call, pattern)`` rows
of tests/test_bad_inputs.py: ``call(tmp_path)`` returns the converter's error (or ``converted``)
and what is left on disk; ``pattern`` is a regular expression that text must match (``re.S``).
The state dicts are torchvision's layouts built on the meta device, saved as expanded zeros (a few
kB each): nothing is downloaded."""
import contextlib
import errno
import os
import random
import re
from unittest import mock

import pytest
import torch

torchvision = pytest.importorskip("torchvision")
pytest.importorskip("detectron2")

from tools.convert_vgg16_to_d2 import check_vgg16, convert_vgg16_checkpoint  # noqa: E402


def _fake(arch="vgg16", conv1_channels=3):
    """A state dict with the names and shapes of ``torchvision.models.<arch>``."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in getattr(torchvision.models, arch)(weights=None).state_dict().items()}
    shapes["features.0.weight"] = (64, conv1_channels, 3, 3)
    return {k: torch.zeros(()).expand(s) for k, s in shapes.items()}


def convert(src="v.pth", dst="out.pth", state=None, data=None, link=None, during=contextlib.nullcontext):
    """Write ``src`` (``state``, default a VGG-16 layout, or raw ``data`` bytes), make ``dst`` a
    ``link`` ("symlink" / "hardlink") to it if asked, run the converter inside ``during()``;
    return its outcome, then whether the input is unchanged and the folder's files."""

    def call(tmp):
        s, d = tmp / src, tmp / dst
        if data is None:
            torch.save(_fake() if state is None else state, s)
        else:
            s.write_bytes(data)
        if link == "symlink":
            d.symlink_to(s)
        elif link == "hardlink":
            os.link(s, d)
        before = s.read_bytes()
        try:
            with during():
                outcome = f"converted {convert_vgg16_checkpoint(str(s), str(d))} tensors"
        except (ValueError, OSError) as e:
            outcome = f"{type(e).__name__}: {e}"
        return f"{outcome}\ninput unchanged: {s.read_bytes() == before}; files: {sorted(os.listdir(tmp))}"

    return call


def disk_full(tmp):
    """The write of the output fails half-way (``ENOSPC``): the previous output stays as it was,
    and no partial file is left."""

    def fail(obj, f, *args, **kwargs):
        with open(f, "wb") if isinstance(f, (str, os.PathLike)) else f as out:
            out.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    (tmp / "out.pth").write_bytes(b"previous output")
    text = convert(during=lambda: mock.patch("torch.save", fail))(tmp)
    return f"{text}\nout.pth: {(tmp / 'out.pth').read_bytes()!r}"


RANDOM_BYTES = bytes(random.Random(0).randrange(256) for _ in range(4096))
SAME = r"ValueError: output \S*/{dst} is the input \S*/v\.pth \(the same file\): give another output path\ninput unchanged: True"
NOT_VGG16 = r"ValueError: \S*/v\.pth is not torchvision's VGG-16: it holds "
EXPECTED = r"Expected VGG-16's 13 convolutions, no batch norm, conv1 taking 3 channels"

ROWS = [
    # item 2: the output is the input
    ("convert-output-is-input", convert(dst="v.pth"), SAME.format(dst=r"v\.pth") + r"; files: \['v\.pth'\]$"),
    ("convert-output-symlink-to-input", convert(dst="link.pth", link="symlink"), SAME.format(dst=r"link\.pth")),
    ("convert-output-hardlink-to-input", convert(dst="hard.pth", link="hardlink"), SAME.format(dst=r"hard\.pth")),
    # item 5: VGG-16 by its shapes
    ("convert-vgg11", convert(state=_fake("vgg11")), NOT_VGG16 + r"8 convolutions under features\.\*, no batch norm, conv1 taking 3 channels \(a VGG-11\); .*" + EXPECTED + r".*files: \['v\.pth'\]$"),
    ("convert-vgg16-bn", convert(state=_fake("vgg16_bn")), NOT_VGG16 + r"13 convolutions under features\.\*, with batch norm, conv1 taking 3 channels \(a VGG-16-BN\); .*" + EXPECTED),
    ("convert-1-channel-conv1", convert(state=_fake(conv1_channels=1)), NOT_VGG16 + r"13 convolutions under features\.\*, no batch norm, conv1 taking 1 channels \(a VGG-16\); first difference: features\.0\.weight \(64, 1, 3, 3\), VGG-16's \(64, 3, 3, 3\)\. " + EXPECTED),
    # item 13: unreadable input, atomic output
    ("convert-empty-file", convert(data=b""), r"ValueError: \S*/v\.pth \(0 bytes\) is not a readable PyTorch state dict: it is empty, truncated or another kind of file.*Download torchvision's vgg16 weights again"),
    ("convert-random-bytes", convert(data=RANDOM_BYTES), r"ValueError: \S*/v\.pth \(4096 bytes\) is not a readable PyTorch state dict: it is empty, truncated or another kind of file"),
    ("convert-pickled-module", convert(state=torch.nn.Linear(2, 2)), r"ValueError: \S*/v\.pth holds pickled objects \(torch\.nn\.modules\.linear\.Linear\), not a state dict of tensors; it was not loaded\. Save the weights with torch\.save\(torchvision\.models\.vgg16\(weights=\.\.\.\)\.state_dict\(\), path\)"),
    ("convert-disk-full-keeps-previous-output", disk_full, r"OSError: \[Errno 28\] No space left on device\ninput unchanged: True; files: \['out\.pth', 'v\.pth'\]\nout\.pth: b'previous output'$"),
]


@pytest.mark.parametrize("case,call,pattern", [pytest.param(*r, id=r[0]) for r in ROWS])
def test_bad_input(case, call, pattern, tmp_path):
    text = call(tmp_path)
    assert re.search(pattern, text, re.S), f"{case}: {pattern!r} not found in:\n{text}"
    assert "weights_only=False" not in text and "weights_only` set to `False" not in text


def test_the_fake_vgg16_passes_the_check():
    """The fakes above differ from VGG-16 only where each row says."""
    check_vgg16(_fake())
