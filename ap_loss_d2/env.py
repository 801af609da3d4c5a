"""Report the environment: ``python -m ap_loss_d2.env [--short]``.

Prints Python/torch/torchvision/Detectron2 versions, which Detectron2 install path was taken
(see tools/install_detectron2.py), whether Detectron2's compiled ops exist, and CUDA status.
"""
import argparse
import importlib.metadata
import importlib.util
import json
import platform
import sys
from pathlib import Path


def _dist_version(*names):
    for name in names:
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None, None


def detectron2_info():
    """Dict describing the Detectron2 of this interpreter (feature-detected, not version-compared)."""
    info = {"importable": importlib.util.find_spec("detectron2") is not None}
    if not info["importable"]:
        return info
    import detectron2

    info["version"] = getattr(detectron2, "__version__", "unknown")
    info["location"] = str(Path(detectron2.__file__).parent)
    info["distribution"], info["dist_version"] = _dist_version("detectron2", "pb1-detectron2")
    record = Path(sys.prefix) / "ap_loss_d2-detectron2.json"
    if record.exists():
        info["install_path"] = json.loads(record.read_text())["path"]
    elif info["distribution"] == "pb1-detectron2":
        info["install_path"] = "pypi-fallback"
    else:
        info["install_path"] = "existing (not installed by ap_loss_d2)"
    info.update(compiled_ops_status())
    return info


def compiled_ops_status():
    """Whether ``detectron2._C`` is the real compiled extension or ap_loss_d2's placeholder."""
    try:
        from detectron2 import _C
    except ImportError as e:
        return {"compiled_ops": False, "compiled_ops_detail": f"detectron2._C missing: {e}"}
    if getattr(_C, "AP_LOSS_D2_FALLBACK", 0):
        return {
            "compiled_ops": False,
            "compiled_ops_detail": "placeholder _C (no deformable/rotated ops, no fast COCO eval)",
        }
    return {"compiled_ops": True, "compiled_ops_detail": f"compiled with {_C.get_compiler_version()}"}


def has_compiled_ops():
    return importlib.util.find_spec("detectron2") is not None and compiled_ops_status()["compiled_ops"]


def collect():
    import torch

    rows = [
        ("Python", sys.version.split()[0] + f" ({platform.platform()})"),
        ("torch", f"{torch.__version__} (CUDA build: {torch.version.cuda})"),
    ]
    tv = _dist_version("torchvision")[1]
    rows.append(("torchvision", tv or "not installed"))
    d2 = detectron2_info()
    if d2["importable"]:
        rows += [
            ("detectron2", f"{d2['version']} from {d2['location']}"),
            ("detectron2 distribution", f"{d2['distribution']} {d2['dist_version']}"),
            ("detectron2 install path", d2["install_path"]),
            ("detectron2 compiled ops", f"{d2['compiled_ops']} ({d2['compiled_ops_detail']})"),
        ]
    else:
        rows.append(("detectron2", "not importable (ap_loss / auc_loss still work)"))
    import ap_loss_d2

    rows.append(("ap_loss_d2", f"{ap_loss_d2.__version__} from {Path(ap_loss_d2.__file__).parent}"))
    cuda = torch.cuda.is_available()
    rows.append(("CUDA available", str(cuda)))
    if cuda:
        rows.append(("GPU", ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))))
    rows.append(("CPU threads", str(torch.get_num_threads())))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="one line per key package")
    args = parser.parse_args(argv)
    rows = collect()
    if args.short:
        keep = ("torch", "torchvision", "detectron2", "detectron2 install path", "detectron2 compiled ops", "CUDA available")
        rows = [r for r in rows if r[0] in keep]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
