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


# ------------------------------------------------------------ the lab commands of README and docs
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]
LAB_COMMAND = re.compile(r"python -m ((?:studies|tools)\.\w+)([^`\n#|]*)")

#: The test that runs each documented lab command (or its smallest setting): module -> test.
#: Commands that need CUDA, COCO / VOC data or hours are also parsed by
#: test_documented_lab_commands_parse with their documented arguments.
RUNS = {
    "studies.main_job": "tests/test_train_net.py::test_main_job_in_process_prints_what_train_net_returned",
    "studies.lr_sweep": "tests/test_lr_sweep.py::test_tiny_real_sweep",
    "studies.report": "tests/test_report.py::test_report_tables_contain_exactly_the_runs_numbers",
    "studies.robustness": "tests/test_robustness.py::test_cli_end_to_end_json_equals_evaluator",
    "studies.score_distribution": "tests/test_score_distribution.py::test_json_bins_equal_recomputed_from_npz",
    "studies.optimization": "tests/test_optimization_study.py::test_fig8a_numbers_are_the_recorded_ones",
    "studies.training_curves": "tests/test_paper_figures.py::test_training_curves",
    "studies.visualize": "tests/test_paper_figures.py::test_visualize",
    "studies.a2_example": "tests/test_a2_example.py::test_cli_writes_table_json_png",
    "studies.cost": "tests/test_cost.py::test_both_sources_labelled",
    "studies.roi_sampling": "tests/test_roi_study.py::test_report_files",
    "tools.benchmark": "tests/test_benchmark.py::test_benchmark_quick",
    "tools.env": "tests/test_readme.py::test_make_env_and_tools_env_run",
}


def _lab_commands():
    """``(doc file, module, argv)`` of every ``python -m studies.<x>`` / ``tools.<x>`` command in
    README.md and docs/*.md: continuation lines and inline code broken over lines joined,
    optional ``[...]`` parts and comments dropped, ``$VAR`` replaced by the doc's ``VAR=...``."""
    import shlex

    out = []
    for path in DOCS:
        chunks = path.read_text().replace("\\\n", " ").split("```")
        for i in range(0, len(chunks), 2):  # inline code outside fenced blocks: one line
            chunks[i] = re.sub(r"`[^`]*`", lambda m: m.group(0).replace("\n", " "), chunks[i])
        text = "```".join(chunks)
        env = dict(re.findall(r"^(\w+)=(\S+?);?(?: |$)", text, re.M))
        for m in LAB_COMMAND.finditer(text):
            args = re.sub(r"\[[^\]]*\]", " ", m.group(2))
            args = re.sub(r"\$(\w+)", lambda v: env[v.group(1)], args)
            out.append((path.name, m.group(1), shlex.split(args)))
    return out


def test_lab_commands_found():
    found = {module for _, module, _ in _lab_commands()}
    assert found == set(RUNS), "a documented command without a test in RUNS, or the reverse"
    assert len(_lab_commands()) >= 30


def test_every_lab_command_has_a_test_that_runs_it():
    import ast

    for module, test in RUNS.items():
        path, name = test.split("::")
        tree = ast.parse((REPO / path).read_text())
        assert name in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, (module, test)


#: The module of docs/studies.md's ``--import my_losses`` example: a loss of the user's own.
MY_LOSSES = """
from ap_loss_d2.losses.registry import CLS_LOSS_REGISTRY, ClsLoss


@CLS_LOSS_REGISTRY.register()
class DocsToyBrier(ClsLoss):
    name, label = "toy_brier", "Toy Brier"
    heads = ("retinanet",)

    def loss(self, logits, gt_labels, stats, normalizer, entries_per_image):
        return logits.sigmoid().sum()
"""


@pytest.fixture
def my_losses(tmp_path, monkeypatch):
    import sys

    (tmp_path / "my_losses.py").write_text(MY_LOSSES)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    if "my_losses" in sys.modules:
        from ap_loss_d2.losses.registry import CLS_LOSS_REGISTRY

        del sys.modules["my_losses"]
        del CLS_LOSS_REGISTRY._obj_map["DocsToyBrier"]  # fvcore's Registry has no public unregister


def test_documented_lab_commands_parse(my_losses):
    """Each documented command's arguments parse with its module's own parser (``main`` is not
    run: several need CUDA, VOC data or hours)."""
    import contextlib
    import importlib
    import io

    pytest.importorskip("detectron2")
    failed = []
    for doc, module, argv in _lab_commands():
        mod = importlib.import_module(module)
        parse = getattr(mod, "parse_args", None) or (lambda a: mod.build_parser().parse_args(a))
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                parse(argv)
        except SystemExit:
            failed.append(f"{doc}: python -m {module} {' '.join(argv)}\n{err.getvalue()}")
    assert failed == []


def test_makefile_lab_targets_name_existing_modules():
    import importlib

    make = (REPO / "Makefile").read_text()
    targets = dict(re.findall(r"^(main|env|benchmark):.*\n\t\$\(PY\) -m (\S+)", make, re.M))
    assert targets == {"main": "studies.main_job", "env": "tools.env", "benchmark": "tools.benchmark"}
    for module in targets.values():
        assert callable(importlib.import_module(module).main)


@pytest.mark.slow  # two processes, about 10 s
def test_make_env_and_tools_env_run():
    """``make env`` (= ``python -m tools.env``) and ``--short`` (tools/setup_env.sh) print the
    report from the repository root."""
    import subprocess
    import sys

    full = subprocess.run([sys.executable, "-m", "tools.env"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    short = subprocess.run([sys.executable, "-m", "tools.env", "--short"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert full.startswith("python") or "torch" in full
    assert set(short.splitlines()) < set(full.splitlines()) and "detectron2" in short
