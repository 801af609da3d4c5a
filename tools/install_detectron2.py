"""Resolve Detectron2 for this environment (called by tools/setup_env.sh).

Order: (1) keep an importable Detectron2; (2) the official source from GitHub when it can be
reached; (3) the PyPI fallback ``pb1-detectron2==0.6`` (official v0.6 Python sources, no C++
sources) built with ap_loss_d2's placeholder ``_C`` (tools/d2_fallback/vision.cpp) and the pins
in tools/d2_fallback/constraints.txt, which apply to this path only.

tools/setup_env.sh pins ``setuptools<81`` before calling this, on every path: Detectron2's
``detectron2.model_zoo`` imports ``pkg_resources``, which setuptools 81 removed.

The path taken is recorded in ``<sys.prefix>/ap_loss_d2-detectron2.json`` and reported by
``python -m tools.env``. Set AP_LOSS_D2_DETECTRON2=official or =pypi to force a path.
"""
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

OFFICIAL_URL = "https://github.com/facebookresearch/detectron2.git"
FALLBACK_SPEC = "pb1-detectron2==0.6"
HERE = Path(__file__).resolve().parent
RECORD = Path(sys.prefix) / "ap_loss_d2-detectron2.json"


def log(msg):
    print(f"[setup] {msg}", flush=True)


def pip(*args):
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    log(" ".join(cmd[2:]))
    subprocess.run(cmd, check=True)


def record(path, detail, **extra):
    RECORD.write_text(json.dumps({"path": path, "detail": detail, **extra, "time": time.ctime()}, indent=1))
    log(f"Detectron2 path: {path} ({detail})")


def official_reachable(timeout=20):
    if shutil.which("git") is None:
        return False
    try:
        res = subprocess.run(
            ["git", "ls-remote", "--exit-code", OFFICIAL_URL, "HEAD"],
            capture_output=True, timeout=timeout, env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
        )
    except subprocess.TimeoutExpired:
        return False
    return res.returncode == 0


def install_official():
    # setup.py imports torch, so build in this environment (no isolation).
    pip("install", "--no-build-isolation", f"git+{OFFICIAL_URL}")
    importlib.invalidate_caches()
    # pip's PEP 610 record names the commit it built (python -m tools.env shows it too).
    direct_url = importlib.metadata.distribution("detectron2").read_text("direct_url.json") or "{}"
    commit = json.loads(direct_url).get("vcs_info", {}).get("commit_id")
    record("official", f"built from {OFFICIAL_URL} at commit {commit}", commit=commit)


def install_fallback():
    constraints = HERE / "d2_fallback" / "constraints.txt"
    with tempfile.TemporaryDirectory(prefix="ap_loss_d2_d2_") as tmp:
        tmp = Path(tmp)
        # --no-build-isolation: the sdist's setup.py imports torch, already in this environment.
        pip("download", "--no-deps", "--no-build-isolation", "-d", str(tmp), FALLBACK_SPEC)
        sdist = next(tmp.glob("pb1-detectron2-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = next(p for p in tmp.iterdir() if p.is_dir())
        # setup.py ships model-zoo configs from a top-level configs/ (absent in the sdist).
        zoo = src / "detectron2" / "model_zoo" / "configs"
        if zoo.is_dir() and not (src / "configs").exists():
            shutil.move(str(zoo), str(src / "configs"))
        csrc = src / "detectron2" / "layers" / "csrc"
        csrc.mkdir(parents=True, exist_ok=True)
        shutil.copy(HERE / "d2_fallback" / "vision.cpp", csrc / "vision.cpp")
        env_note = "pb1-detectron2 0.6 sdist + placeholder _C, pins: " + ", ".join(
            line.split("#")[0].strip() for line in constraints.read_text().splitlines()
            if line.split("#")[0].strip()
        )
        pip("install", "--no-build-isolation", "-r", str(constraints), "-c", str(constraints), str(src))
    record("pypi-fallback", env_note)


def main():
    forced = os.environ.get("AP_LOSS_D2_DETECTRON2", "").strip().lower()
    if forced not in ("", "official", "pypi"):
        sys.exit(f"AP_LOSS_D2_DETECTRON2={forced!r}: expected 'official' or 'pypi'")
    if not forced and importlib.util.find_spec("detectron2") is not None:
        if not RECORD.exists():
            import detectron2

            record("existing", f"already importable from {Path(detectron2.__file__).parent}")
        else:
            log(f"Detectron2 present ({json.loads(RECORD.read_text())['path']}); keeping it")
        return
    if forced == "official" or (not forced and official_reachable()):
        install_official()
    else:
        log(f"{OFFICIAL_URL} is not reachable: using the PyPI fallback {FALLBACK_SPEC}")
        install_fallback()


if __name__ == "__main__":
    main()
