"""Report the environment: ``python -m tools.env [--short]``.

Prints Python/torch/torchvision/Detectron2 versions; which Detectron2 it is: v0.6 release code or
the main branch (told apart by main-only features, as both say version 0.6), a release or a
source build (from pip's ``direct_url.json``: repository and commit, or source folder), the
install path taken (see tools/install_detectron2.py); whether Detectron2's compiled ops are real
or the placeholder; the numpy / setuptools (and pkg_resources) / omegaconf / hydra-core / Pillow
/ fvcore / iopath versions; CUDA status.
"""
import argparse
import importlib.metadata
import importlib.util
import json
import platform
import shutil
import subprocess
import sys
import warnings
from pathlib import Path


def _dist_version(*names):
    for name in names:
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None, None


# Features of Detectron2's main branch that the v0.6 release (Nov 2021, the last release) lacks;
# __version__ is "0.6" on both, so the code is told apart by these.
def _main_branch_features():
    found = []
    if importlib.util.find_spec("detectron2.tracking") is not None:
        found.append("detectron2.tracking")
    modeling = importlib.util.find_spec("detectron2.modeling")  # located, not imported
    if modeling is not None and any(
        Path(d, "backbone", "vit.py").is_file() for d in modeling.submodule_search_locations or ()
    ):
        found.append("ViT backbone")
    with warnings.catch_warnings():  # torch's deprecation notices from importing Detectron2 modules
        warnings.simplefilter("ignore", FutureWarning)
        from detectron2.checkpoint import DetectionCheckpointer
    from torch import nn

    if hasattr(DetectionCheckpointer(nn.Module()), "_parsed_url_during_load"):
        found.append("checkpoint ?options")
    return found


def _direct_url(distribution):
    """pip's record of where a distribution was installed from (PEP 610), or None."""
    try:
        text = importlib.metadata.distribution(distribution).read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return None
    return json.loads(text) if text else None


def _git_commit(path):
    if not path or not Path(path, ".git").exists() or shutil.which("git") is None:
        return None
    res = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True)
    return res.stdout.strip() or None if res.returncode == 0 else None


def describe_detectron2(distribution, dist_version, direct_url, main_features, record=None):
    """Which Detectron2 this is: ``{"code": ..., "build": ..., "commit": ...}`` (strings / None).

    distribution / dist_version: the installed distribution (``detectron2``, ``pb1-detectron2``);
    direct_url: its PEP 610 ``direct_url.json`` (None when installed from a package index);
    main_features: main-branch features found (empty for v0.6 code); record: the
    ``ap_loss_d2-detectron2.json`` written by the project's set-up scripts, if any.
    """
    record = record or {}
    if main_features:
        code = "main branch (newer than the v0.6 release: " + ", ".join(main_features) + ")"
    else:
        code = "v0.6 release (no feature newer than v0.6 found)"
    commit = record.get("commit")
    direct_url = direct_url or {}
    url = direct_url.get("url", "")
    local = url[len("file://"):] if url.startswith("file://") else None
    if distribution == "pb1-detectron2":
        build = f"release: PyPI pb1-detectron2 {dist_version} (official v0.6 Python sources), built here"
    elif "vcs_info" in direct_url:
        vcs = direct_url["vcs_info"]
        commit = commit or vcs.get("commit_id")
        build = f"source build from {url}" + (f" ({vcs['requested_revision']})" if vcs.get("requested_revision") else "")
    elif "dir_info" in direct_url:
        editable = direct_url["dir_info"].get("editable", False)
        where = record.get("source") or local or url
        build = ("editable source checkout " if editable else "source build from ") + where
        commit = commit or _git_commit(where)
    elif "archive_info" in direct_url:
        build = f"built from the archive {url}"
    elif distribution:
        build = f"release: {distribution} {dist_version} from a package index"
    else:
        build = "unknown (no installed distribution owns detectron2: on sys.path as a plain folder)"
    return {"code": code, "build": build, "commit": commit}


def detectron2_info():
    """Dict describing the Detectron2 of this interpreter (feature-detected, not version-compared)."""
    info = {"importable": importlib.util.find_spec("detectron2") is not None}
    if not info["importable"]:
        return info
    import detectron2

    info["version"] = getattr(detectron2, "__version__", "unknown")
    info["location"] = str(Path(detectron2.__file__).parent)
    info["distribution"], info["dist_version"] = _dist_version("detectron2", "pb1-detectron2")
    record_file = Path(sys.prefix) / "ap_loss_d2-detectron2.json"
    record = json.loads(record_file.read_text()) if record_file.exists() else None
    if record is not None:
        info["install_path"] = record["path"]
    elif info["distribution"] == "pb1-detectron2":
        info["install_path"] = "pypi-fallback"
    else:
        info["install_path"] = "existing (not installed by ap_loss_d2)"
    info["main_features"] = _main_branch_features()
    direct_url = _direct_url(info["distribution"]) if info["distribution"] else None
    info.update(
        describe_detectron2(info["distribution"], info["dist_version"], direct_url, info["main_features"], record)
    )
    info.update(compiled_ops_status())
    return info


def package_versions():
    """Versions of the packages whose releases decide whether Detectron2 works (None: absent)."""
    versions = {
        name: _dist_version(name)[1]
        for name in ("numpy", "setuptools", "omegaconf", "hydra-core", "Pillow", "fvcore", "iopath")
    }
    # setuptools >= 81 has no pkg_resources, which detectron2.model_zoo imports.
    versions["pkg_resources"] = "importable" if _find_spec("pkg_resources") else "missing"
    return versions


def _find_spec(name):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


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
            ("detectron2 code", d2["code"]),
            ("detectron2 build", d2["build"]),
            ("detectron2 commit", d2["commit"] or "unknown"),
            ("detectron2 distribution", f"{d2['distribution']} {d2['dist_version']}"),
            ("detectron2 install path", d2["install_path"]),
            ("detectron2 compiled ops", f"{d2['compiled_ops']} ({d2['compiled_ops_detail']})"),
        ]
    else:
        rows.append(("detectron2", "not importable (ap_loss / auc_loss still work)"))
    rows += [(name, version or "not installed") for name, version in package_versions().items()]
    import ap_loss_d2

    rows.append(("ap_loss_d2", f"{ap_loss_d2.__version__} from {Path(ap_loss_d2.__file__).parent}"))
    cuda = torch.cuda.is_available()
    rows.append(("CUDA available", str(cuda)))
    if cuda:
        rows.append(("GPU", ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))))
    rows.append(("CPU threads", str(torch.get_num_threads())))
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.env", description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="one line per key package")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    rows = collect()
    if args.short:
        keep = ("torch", "torchvision", "detectron2", "detectron2 code", "detectron2 build",
                "detectron2 install path", "detectron2 compiled ops", "numpy", "CUDA available")
        rows = [r for r in rows if r[0] in keep]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
