"""README.md: at most 300 lines, and every relative link resolves to a file of the repository
(and a #fragment to a heading of that file)."""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path):
    return {_slug(line.lstrip("#")) for line in path.read_text().splitlines() if line.startswith("#")}


def _relative_links(text: str):
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def test_readme_is_at_most_300_lines():
    assert len(README.read_text().splitlines()) <= 300


def test_every_relative_readme_link_resolves():
    links = _relative_links(README.read_text())
    assert links  # the README links its docs
    broken = []
    for link in links:
        target, _, fragment = link.partition("#")
        path = (README.parent / target).resolve() if target else README
        if not path.is_file() or not path.is_relative_to(REPO):
            broken.append(link)
        elif fragment and path.suffix == ".md" and fragment not in _anchors(path):
            broken.append(link)
    assert broken == []


def test_link_checker_finds_a_broken_link():
    assert _relative_links("[a](docs/x.md) [b](https://x.org/y) [c](#sec)") == ["docs/x.md", "#sec"]
    assert _slug(" Main job: each loss at its best learning rate (LR sweep)") == \
        "main-job-each-loss-at-its-best-learning-rate-lr-sweep"


def _train_net_commands():
    """The README's ``python train_net.py ...`` commands with a real config, continuation lines
    joined and comments dropped, as argument lists."""
    import shlex

    text = README.read_text().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        line = re.sub(r"^(\w+=\S+ )+", "", line)  # environment assignments, e.g. OMP_NUM_THREADS=1
        if line.startswith("python train_net.py") and "<cfg>" not in line:
            commands.append(shlex.split(line.split("#", 1)[0])[2:])
    return commands


@pytest.mark.slow  # loads a LazyConfig (model-zoo imports)
def test_readme_training_commands_load_their_configs():
    """Each README training command's arguments parse with Detectron2's parser and its config,
    with the command's overrides, loads (yaml: validated; LazyConfig: the override lands)."""
    import functools

    pytest.importorskip("detectron2")
    from detectron2.config import LazyConfig
    from detectron2.engine import default_argument_parser

    from ap_loss_d2.engine import get_ap_loss_cfg, validate_cfg

    commands = _train_net_commands()
    assert len(commands) == 5  # RetinaNet yaml x 2, LazyConfig, SSD paper and CPU configs
    for argv in commands:
        args = default_argument_parser().parse_args(argv)
        if args.config_file.endswith(".py"):
            cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
            for key, value in (o.split("=", 1) for o in args.opts):
                node = cfg
                for part in key.split("."):
                    node = node[part]
                assert str(node) == value
        else:
            cfg = get_ap_loss_cfg()
            cfg.merge_from_file(args.config_file)
            cfg.merge_from_list(args.opts)
            validate_cfg(cfg)
            assert [str(functools.reduce(getattr, k.split("."), cfg)) for k in args.opts[::2]] \
                == args.opts[1::2]
