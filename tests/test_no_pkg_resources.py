"""The project's LazyConfigs and a LazyConfig training run work without ``pkg_resources``.

setuptools >= 81 no longer ships ``pkg_resources``, which ``detectron2.model_zoo`` imports (v0.6
and main). Each check runs in a subprocess whose ``sitecustomize`` makes ``import pkg_resources``
raise ``ModuleNotFoundError``, as on such an environment.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("detectron2")

REPO = Path(__file__).resolve().parents[1]
LAZY_CONFIGS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs" / "lazy").rglob("*.py"))
TINY_LAZY = "tests/configs/tiny_synth_retinanet_lazy.py"


@pytest.fixture(scope="module")
def no_pkg_resources_env(tmp_path_factory):
    shim = tmp_path_factory.mktemp("hide_pkg_resources")
    (shim / "sitecustomize.py").write_text(
        "import sys\n"
        "sys.modules['pkg_resources'] = None  # import fails as with setuptools >= 81\n"
    )
    path = os.pathsep.join(p for p in (str(shim), str(REPO), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def run(env, *args, timeout=600):
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, text=True, timeout=timeout,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    return proc.returncode, proc.stdout


@pytest.mark.slow  # launches a process
def test_pkg_resources_is_hidden(no_pkg_resources_env):
    """The shim works, and it breaks what needs pkg_resources (so the tests below are meaningful)."""
    rc, out = run(no_pkg_resources_env, "-c", "import pkg_resources")
    assert rc != 0 and "ModuleNotFoundError" in out, out
    rc, out = run(no_pkg_resources_env, "-c", "import detectron2.model_zoo")
    assert rc != 0 and "pkg_resources" in out, out


@pytest.mark.slow  # launches a process
def test_lazy_configs_load_and_build_without_pkg_resources(no_pkg_resources_env):
    code = textwrap.dedent(
        f"""
        import torch
        from detectron2.config import LazyConfig, instantiate
        from train_net import check_lazy_cls_loss
        torch.set_num_threads(1)
        for path in {LAZY_CONFIGS!r}:
            cfg = LazyConfig.load(path)
            if "/common/" in path:
                continue
            assert {{"model", "dataloader", "optimizer", "lr_multiplier", "train"}} <= set(cfg.keys()), path
            check_lazy_cls_loss(cfg)
            assert isinstance(instantiate(cfg.model), torch.nn.Module), path
            print("built", path)
        """
    )
    rc, out = run(no_pkg_resources_env, "-c", code)
    assert rc == 0, out[-6000:]
    built = [line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("built ")]
    assert built == [p for p in LAZY_CONFIGS if "/common/" not in p]


@pytest.mark.slow
def test_lazy_train_net_without_pkg_resources(no_pkg_resources_env, synth_dataset_dir, tmp_path):
    out = tmp_path / "lazy"
    rc, log = run(
        no_pkg_resources_env, "train_net.py", "--config-file", TINY_LAZY,
        f"train.output_dir={out}", "train.max_iter=2",
    )
    assert rc == 0, log[-6000:]
    assert (out / "model_final.pth").is_file()
    assert "copypaste: Task: bbox" in log  # evaluated after training
