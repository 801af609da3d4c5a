"""``python -m tools.env``: which Detectron2 (v0.6 release code or main, release or source
build, commit), compiled ops, and the versions of the packages Detectron2 depends on."""
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools.env import describe_detectron2

REPO = Path(__file__).resolve().parents[1]
COMMIT = "02b5c4e295e990042a714712c21dc79b731e8833"


def test_describe_pypi_fallback_release():
    d = describe_detectron2("pb1-detectron2", "0.6", {"url": "file:///tmp/x", "dir_info": {}}, [])
    assert d["code"].startswith("v0.6 release")
    assert d["build"].startswith("release: PyPI pb1-detectron2 0.6")
    assert d["commit"] is None


def test_describe_git_install_of_main():
    direct = {"url": "https://github.com/facebookresearch/detectron2.git",
              "vcs_info": {"vcs": "git", "commit_id": COMMIT, "requested_revision": "main"}}
    d = describe_detectron2("detectron2", "0.6", direct, ["detectron2.tracking"])
    assert d["code"].startswith("main branch") and "detectron2.tracking" in d["code"]
    assert d["build"] == "source build from https://github.com/facebookresearch/detectron2.git (main)"
    assert d["commit"] == COMMIT


def test_describe_index_release_and_local_builds(tmp_path):
    d = describe_detectron2("detectron2", "0.6+cu113", None, [])
    assert d["code"].startswith("v0.6 release") and d["build"].startswith("release: detectron2 0.6+cu113")
    d = describe_detectron2("detectron2", "0.6", {"url": f"file://{tmp_path}", "dir_info": {"editable": True}},
                            ["ViT backbone"])
    assert d["build"] == f"editable source checkout {tmp_path}" and d["code"].startswith("main branch")
    record = {"path": "source-tree", "source": "/src/d2", "commit": COMMIT}
    d = describe_detectron2("detectron2", "0.6", {"url": "file:///tmp/build", "dir_info": {}}, ["x"], record)
    assert d["build"] == "source build from /src/d2" and d["commit"] == COMMIT


def _report(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-m", "tools.env", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # "key<padding>  value" per line
    return dict(map(str.strip, line.split("  ", 1)) for line in proc.stdout.splitlines() if line.strip())


@pytest.mark.slow  # launches a process
def test_report_tells_this_detectron2_apart():
    """Checked against what is on disk: main has detectron2/tracking/ (added after v0.6) and
    pip's metadata names the distribution (pb1-detectron2: the v0.6 release on PyPI)."""
    pytest.importorskip("detectron2")
    import detectron2

    rows = _report()
    is_main = (Path(detectron2.__file__).parent / "tracking" / "__init__.py").is_file()
    assert rows["detectron2 code"].startswith("main branch" if is_main else "v0.6 release"), rows
    dists = {d.metadata["Name"] for d in importlib.metadata.distributions()}
    if "pb1-detectron2" in dists:
        assert rows["detectron2 build"].startswith("release: PyPI pb1-detectron2")
    else:
        direct = importlib.metadata.distribution("detectron2").read_text("direct_url.json")
        if direct and "vcs_info" in json.loads(direct):
            assert rows["detectron2 commit"] == json.loads(direct)["vcs_info"]["commit_id"]
        if direct:
            assert "source" in rows["detectron2 build"]
    from detectron2 import _C

    placeholder = bool(getattr(_C, "AP_LOSS_D2_FALLBACK", 0))
    assert rows["detectron2 compiled ops"].startswith("False (placeholder" if placeholder else "True")
    for name in ("numpy", "setuptools", "omegaconf", "hydra-core"):
        assert rows[name] == importlib.metadata.version(name), name
    short = _report("--short")
    assert short["detectron2 code"] == rows["detectron2 code"]
