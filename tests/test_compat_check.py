"""tools/check_detectron2_source.sh and the set-up scripts: what can be checked without building
an environment (the full check is run by hand, see docs/development.md)."""
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECK = REPO / "tools" / "check_detectron2_source.sh"


@pytest.mark.slow  # launches a process
def test_check_script_parses_and_rejects_a_non_tree(tmp_path):
    subprocess.run(["bash", "-n", str(CHECK)], check=True)
    proc = subprocess.run(["bash", str(CHECK), str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "usage:" in proc.stderr and "setup.py" in proc.stderr
    assert not any(tmp_path.iterdir())


def _fallback_pins():
    lines = (REPO / "tools" / "d2_fallback" / "constraints.txt").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def test_install_doc_states_the_fallback_pins():
    install = (REPO / "docs" / "install.md").read_text()
    stated = re.findall(r"`([A-Za-z-]+[<>=][^`]*)`", install.split("offline PyPI fallback", 1)[1].split("Force a path", 1)[0])
    assert stated == _fallback_pins()


def test_setuptools_pin_on_every_path():
    """setup_env.sh installs setuptools<81 whenever pkg_resources is missing, before any
    Detectron2 path is chosen, and installs torch without a numpy pin."""
    script = (REPO / "tools" / "setup_env.sh").read_text()
    code = [line for line in script.splitlines() if not line.lstrip().startswith("#")]
    body = "\n".join(code)
    assert body.index('install "setuptools<81"') < body.index("tools/install_detectron2.py")
    assert "numpy" not in body
    assert "setuptools<81" in _fallback_pins()
