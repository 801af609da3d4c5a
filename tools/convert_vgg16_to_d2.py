"""Convert torchvision's ImageNet VGG-16 into a Detectron2 checkpoint of SSD's VGG-16 backbone.

    python tools/convert_vgg16_to_d2.py vgg16-397923af.pth vgg16_ssd_d2.pth

Input: torchvision's ``vgg16`` state dict (download it yourself, e.g. from the address in
``torchvision.models.VGG16_Weights.IMAGENET1K_V1.url``), read without running any pickled code
and checked by its tensor shapes. Output (never the input; written to a temporary file in the
same folder, then renamed): ``{"model", "__author__", "matching_heuristics": False}`` with the
``backbone.*`` names of ``ap_loss_d2.modeling.VGG16SSD`` for ``MODEL.WEIGHTS`` (docs/ssd.md).
"""
import argparse
import os
import pickle
import re
import tempfile

import torch

from ap_loss_d2.modeling.vgg import VGG16SSD

_DEPTHS = {8: "VGG-11", 10: "VGG-13", 13: "VGG-16", 16: "VGG-19"}
_DOWNLOAD = "torchvision.models.VGG16_Weights.IMAGENET1K_V1.url"


def _load(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's message advises unsafe loading: not repeated
        objects = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(e))))
        if objects:
            raise ValueError(
                f"{path} holds pickled objects ({', '.join(objects)}), not a state dict of tensors; it "
                "was not loaded. Save the weights with torch.save(torchvision.models.vgg16(weights=...)"
                ".state_dict(), path)"
            ) from None
        error = type(e).__name__
    except (EOFError, RuntimeError, ValueError, KeyError, IndexError, TypeError) as e:
        error = type(e).__name__
    raise ValueError(
        f"{path} ({os.path.getsize(path)} bytes) is not a readable PyTorch state dict: it is empty, truncated or "
        f"another kind of file ({error}). Download torchvision's vgg16 weights again (address: {_DOWNLOAD})"
    )


def check_vgg16(state, path: str = "state dict") -> None:
    """ValueError naming ``path``, what it holds and what VGG-16 has, unless ``state`` has the
    tensor shapes of torchvision's ``vgg16`` (13 convolutions from 3 channels, no batch norm,
    fc6 / fc7 of 4096 x 25088 / 4096 x 4096)."""
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        keys = f" (keys {list(state)[:5]})" if isinstance(state, dict) else f" (a {type(state).__name__})"
        raise ValueError(f"{path} is not a state dict of tensors{keys}: save torchvision's with torch.save(model.state_dict(), path)")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in VGG16SSD(out_features=("conv7",)).state_dict().items() if k.startswith("features.")}
    expected.update({"classifier.0.weight": (4096, 25088), "classifier.0.bias": (4096,), "classifier.3.weight": (4096, 4096),
                     "classifier.3.bias": (4096,)})
    found = {k: tuple(v.shape) for k, v in state.items() if k.startswith(("features.", "classifier.0.", "classifier.3."))}
    if found == expected:
        return
    convs = [s for k, s in found.items() if k.startswith("features.") and len(s) == 4]
    bn = any(k.endswith("running_mean") for k in state)
    name = f" (a {_DEPTHS[len(convs)]}{'-BN' if bn else ''})" if len(convs) in _DEPTHS else ""
    first = next(k for k in [*expected, *found] if found.get(k) != expected.get(k))
    raise ValueError(
        f"{path} is not torchvision's VGG-16: it holds {len(convs)} convolutions under features.*, "
        f"{'with' if bn else 'no'} batch norm, conv1 taking {convs[0][1] if convs else '?'} channels{name}; first "
        f"difference: {first} {found.get(first, 'missing')}, VGG-16's {expected.get(first, 'absent')}. Expected VGG-16's "
        f"13 convolutions, no batch norm, conv1 taking 3 channels (torchvision.models.vgg16; address: {_DOWNLOAD})"
    )


def convert_torchvision_vgg16(state_dict, path: str = "state dict", prefix: str = "backbone."):
    """torchvision ``vgg16`` state dict -> state dict of :class:`VGG16SSD` (width 1, no norm)
    under ``prefix``: ``features.*`` as they are; fc6 (``classifier.0``, ``4096 x 25088``) as a
    ``4096 x 512 x 7 x 7`` kernel subsampled to ``1024 x 512 x 3 x 3`` (every 4th output channel,
    every 3rd tap: SSD's dilated 3x3); fc7 (``classifier.3``) every 4th input and output channel."""
    check_vgg16(state_dict, path)
    out = {f"{prefix}{k}": v.clone() for k, v in state_dict.items() if k.startswith("features.")}
    out[prefix + "fc6.weight"] = state_dict["classifier.0.weight"].view(4096, 512, 7, 7)[::4, :, ::3, ::3].clone()
    out[prefix + "fc6.bias"] = state_dict["classifier.0.bias"][::4].clone()
    out[prefix + "fc7.weight"] = state_dict["classifier.3.weight"][::4, ::4, None, None].clone()
    out[prefix + "fc7.bias"] = state_dict["classifier.3.bias"][::4].clone()
    return out


def convert_vgg16_checkpoint(src: str, dst: str) -> int:
    """Write ``dst`` converted from ``src`` (see the module doc); returns the number of tensors."""
    if os.path.exists(dst) and os.path.samefile(src, dst):
        raise ValueError(f"output {dst} is the input {src} (the same file): give another output path")
    model = convert_torchvision_vgg16(_load(src), src)
    # Exact names: Detectron2 must not rename them by its heuristics (meant for other layouts).
    checkpoint = {"model": model, "__author__": "torchvision vgg16, converted by ap_loss_d2", "matching_heuristics": False}
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dst)}.", suffix=".tmp", dir=os.path.dirname(os.path.abspath(dst)))
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return len(model)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="torchvision vgg16 state dict (.pth)")
    p.add_argument("dst", help="Detectron2 checkpoint to write (.pth)")
    args = p.parse_args(argv)
    n = convert_vgg16_checkpoint(args.src, args.dst)
    print(f"wrote {args.dst}: {n} tensors of the backbone of APLossSSD (MODEL.WEIGHTS {args.dst})")


if __name__ == "__main__":
    main()
