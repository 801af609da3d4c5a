"""Every config in configs/ loads and builds its model (CPU, no weights); paper settings;
config-time validation of ap_loss_d2's keys."""
import argparse
import ast
import math
from pathlib import Path

import pytest
import yaml

pytest.importorskip("detectron2")

import torch  # noqa: E402
from detectron2.config import LazyConfig, get_cfg, instantiate  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from ap_loss_d2.config import add_ap_loss_config  # noqa: E402
from ap_loss_d2.losses.registry import cls_loss_names  # noqa: E402
from ap_loss_d2.engine import get_ap_loss_cfg, setup_cfg, validate_cfg  # noqa: E402
from train_net import check_lazy_cls_loss  # noqa: E402
from ap_loss_d2.modeling import APLossRetinaNet  # noqa: E402

from .params import slow_except  # noqa: E402

RETINANET_LOSSES = cls_loss_names("retinanet")
REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
YAML_CONFIGS = sorted(p.relative_to(REPO).as_posix() for p in CONFIGS.rglob("*.yaml"))
LAZY_CONFIGS = sorted(p.relative_to(REPO).as_posix() for p in CONFIGS.rglob("*.py"))
TINY_YAML = REPO / "tests" / "configs" / "tiny_synth_retinanet.yaml"
# built in make test-fast: one config per detector and route (every config builds in make test)
FAST_BUILDS = {
    "configs/Base-RetinaNet.yaml",
    "configs/quick/retinanet_R_18_FPN_1000it_synth_ap.yaml",
    "configs/VOC-Detection/retinanet_R_50_FPN_160e_voc0712_ap.yaml",
    "configs/FasterRCNN/faster_rcnn_R_18_FPN_600it_synth_ap.yaml",
    "configs/SSD/ssd192_vgg16n_240it_synth.yaml",
    "configs/lazy/retinanet_R_50_FPN_160e_voc0712_ap.py",
    "configs/lazy/faster_rcnn_R_50_FPN_18k_voc0712_ap.py",
    "configs/lazy/ssd512_vgg16_160e_voc0712_ap.py",
}

VOC_IMAGES, COCO_IMAGES = 16551, 117266  # VOC07+12 trainval, COCO trainval35k
TABLE2_LOSSES = ("ap", "auc", "focal", "ce_ohem")  # the losses compared in the paper's Table 2


def load_yaml_cfg(path, opts=()):
    cfg = get_ap_loss_cfg()
    cfg.merge_from_file(str(REPO / path))
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", *opts])
    return cfg


@pytest.fixture(autouse=True)
def _few_threads(one_thread):
    """Every test of this module runs torch on one thread (tests/conftest.py)."""


def test_configs_found():
    names = {Path(p).name for p in YAML_CONFIGS}
    for loss in TABLE2_LOSSES:
        assert f"retinanet_R_50_FPN_160e_voc0712_{loss}.yaml" in names
        assert f"retinanet_R_50_FPN_100e_coco_{loss}.yaml" in names
    for res in ("500", "800"):
        assert f"retinanet_R_101_FPN_160e_voc0712_ap{res}.yaml" in names
        assert f"retinanet_R_101_FPN_100e_coco_ap{res}.yaml" in names
    lazy = {Path(p).name for p in LAZY_CONFIGS}
    for name in ("retinanet_R_50_FPN_160e_voc0712_ap.py", "retinanet_R_50_FPN_160e_voc0712_focal.py",
                 "retinanet_R_50_FPN_100e_coco_ap.py"):
        assert name in lazy


@pytest.mark.parametrize("path", YAML_CONFIGS)
def test_bases_stay_in_repo(path):
    base = yaml.unsafe_load((REPO / path).read_text()).get("_BASE_")
    if base is None:
        return
    assert "://" not in base, f"{path}: _BASE_ {base!r} is not a local file"
    target = (REPO / path).parent.joinpath(base).resolve()
    assert target.is_file(), f"{path}: _BASE_ {base!r} does not exist"
    assert REPO in target.parents, f"{path}: _BASE_ {base!r} points outside the repository"


@pytest.mark.parametrize("path", slow_except(YAML_CONFIGS, FAST_BUILDS))
def test_yaml_config_builds(path):
    cfg = load_yaml_cfg(path)
    validate_cfg(cfg)
    model = build_model(cfg)
    assert type(model).__name__ == cfg.MODEL.META_ARCHITECTURE
    if isinstance(model, APLossRetinaNet):
        assert model.cls_loss.name == cfg.MODEL.CLS_LOSS.NAME


PAPER_YAML = [
    p
    for p in YAML_CONFIGS
    if p.startswith(("configs/VOC-Detection/", "configs/COCO-Detection/"))
    and Path(p).name.startswith("retinanet_R_")
]


@pytest.mark.parametrize("path", PAPER_YAML)
def test_paper_settings(path):
    """Sec. 4.1: the settings shared by all RetinaNet paper configs."""
    cfg = load_yaml_cfg(path)
    m, s = cfg.MODEL, cfg.SOLVER
    assert m.META_ARCHITECTURE == "APLossRetinaNet"
    assert m.RESNETS.NORM == "FrozenBN" and m.BACKBONE.FREEZE_AT == 2
    assert m.RESNETS.DEPTH == (101 if "R_101" in path else 50)
    assert m.ANCHOR_GENERATOR.ASPECT_RATIOS == [[0.5, 1.0, 2.0]]
    assert len(m.ANCHOR_GENERATOR.SIZES) == 5
    for level, sizes in enumerate(m.ANCHOR_GENERATOR.SIZES):
        base = 32 * 2**level
        assert sizes == pytest.approx([base, base * 2**0.5], rel=1e-4)
    assert m.RETINANET.NMS_THRESH_TEST == 0.5
    assert m.CLS_LOSS.DELTA == 1.0 and m.CLS_LOSS.INTERPOLATE and m.CLS_LOSS.STEP == "linear"
    assert (s.BASE_LR, s.IMS_PER_BATCH, s.MOMENTUM, s.WEIGHT_DECAY, s.GAMMA) == (0.001, 16, 0.9, 1e-4, 0.1)
    assert cfg.AP_LOSS_INPUT.AUGMENTATION == "ssd"
    assert m.WEIGHTS == ""  # patched by the test; the file itself names the ImageNet weights
    raw = (REPO / path).read_text() + (REPO / path).parent.joinpath(
        yaml.unsafe_load((REPO / path).read_text())["_BASE_"]).read_text()
    assert "ImageNetPretrained" in raw or "Base-" in raw
    if path.endswith("500.yaml") or path.endswith("800.yaml"):
        size = 512 if path.endswith("500.yaml") else 800
        assert cfg.AP_LOSS_INPUT.FIXED_SIZE == size
        assert cfg.INPUT.MIN_SIZE_TEST == (500 if size == 512 else 800)
    else:
        assert cfg.AP_LOSS_INPUT.FIXED_SIZE == 512 and cfg.INPUT.MIN_SIZE_TEST == 600
    if "voc0712" in path:
        images, epochs, drops = VOC_IMAGES, 160, (110, 140)
        assert m.RETINANET.NUM_CLASSES == 20
        # VOC07+12 trainval without "difficult" objects (the authors' loader; test_paper_recipe.py)
        assert cfg.DATASETS.TRAIN == ("voc_2007_trainval_nodifficult", "voc_2012_trainval_nodifficult")
        assert cfg.DATASETS.TEST == ("voc_2007_test",)
    else:
        images, epochs, drops = COCO_IMAGES, 100, (60, 80)
        assert m.RETINANET.NUM_CLASSES == 80
    assert s.MAX_ITER == math.ceil(epochs * images / 16)
    assert s.STEPS == tuple(round(e * images / 16 + 1e-9) for e in drops)


def test_imagenet_weights_named_in_paper_configs():
    for path in PAPER_YAML:
        cfg = get_ap_loss_cfg()
        cfg.merge_from_file(str(REPO / path))
        depth = "101" if "R_101" in path else "50"
        assert cfg.MODEL.WEIGHTS == f"detectron2://ImageNetPretrained/MSRA/R-{depth}.pkl"


@pytest.mark.parametrize("dataset", ["160e_voc0712", "100e_coco"])
def test_loss_twins_differ_only_in_loss(dataset):
    """Paper Table 2: the four losses are trained with identical settings."""
    folder = "VOC-Detection" if "voc" in dataset else "COCO-Detection"
    dumps = {}
    for loss in TABLE2_LOSSES:
        cfg = load_yaml_cfg(f"configs/{folder}/retinanet_R_50_FPN_{dataset}_{loss}.yaml")
        assert cfg.MODEL.CLS_LOSS.NAME == loss
        cfg.MODEL.CLS_LOSS.NAME = "-"
        dumps[loss] = cfg.dump()
    assert len(set(dumps.values())) == 1


@pytest.mark.parametrize("path", slow_except(LAZY_CONFIGS, FAST_BUILDS | {p for p in LAZY_CONFIGS if "/common/" in p}))
def test_lazy_config_builds(path):
    cfg = LazyConfig.load(str(REPO / path))
    if "/common/" in path:
        return  # building blocks, imported by the configs next to them
    assert {"model", "dataloader", "optimizer", "lr_multiplier", "train"} <= set(cfg.keys())
    check_lazy_cls_loss(cfg)
    model = instantiate(cfg.model)
    assert isinstance(model, torch.nn.Module)


LAZY_RETINANET = [p for p in LAZY_CONFIGS if Path(p).name.startswith("retinanet_R_") and not p.startswith("configs/quick/")]


@pytest.mark.parametrize("path", slow_except(LAZY_RETINANET, FAST_BUILDS))
def test_lazy_paper_settings(path):
    cfg = LazyConfig.load(str(REPO / path))
    model = instantiate(cfg.model)
    assert isinstance(model, APLossRetinaNet)
    loss_in_name = Path(path).stem.split("voc0712_" if "voc0712" in path else "coco_", 1)[1]
    assert model.cls_loss.name == cfg.model.cls_loss._target_.name == loss_in_name
    assert model.anchor_generator.num_anchors == [6] * 5
    assert model.test_nms_thresh == 0.5
    assert getattr(model.cls_loss, "options", {"delta": 1.0})["delta"] == 1.0
    assert cfg.optimizer.lr == 0.001 and cfg.optimizer.weight_decay == 1e-4
    assert cfg.optimizer.momentum == 0.9 and cfg.dataloader.train.total_batch_size == 16
    assert cfg.dataloader.train.mapper.augmentations.cfg_or_size == 512
    assert cfg.dataloader.test.mapper.augmentations[0].short_edge_length == 600
    assert cfg.train.init_checkpoint == "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
    images = VOC_IMAGES if "voc0712" in path else COCO_IMAGES
    epochs = 160 if "voc0712" in path else 100
    assert cfg.train.max_iter == math.ceil(epochs * images / 16)
    assert model.num_classes == (20 if "voc0712" in path else 80)


def test_lazy_twin_matches_yaml():
    """The LazyConfig and yaml VOC AP-loss configs describe the same model and schedule."""
    lazy = LazyConfig.load(str(CONFIGS / "lazy" / "retinanet_R_50_FPN_160e_voc0712_ap.py"))
    cfg = load_yaml_cfg("configs/VOC-Detection/retinanet_R_50_FPN_160e_voc0712_ap.yaml")
    torch.manual_seed(0)
    a = instantiate(lazy.model)
    b = build_model(cfg)
    assert a.cls_loss.name == b.cls_loss.name and a.num_classes == b.num_classes
    assert a.cls_loss.options == b.cls_loss.options and vars(a.cls_loss.sets) == vars(b.cls_loss.sets)
    for x, y in zip(a.anchor_generator.cell_anchors, b.anchor_generator.cell_anchors):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-3)
    shapes_a = {k: v.shape for k, v in a.state_dict().items()}
    shapes_b = {k: v.shape for k, v in b.state_dict().items()}
    assert shapes_a == shapes_b
    assert lazy.train.max_iter == cfg.SOLVER.MAX_ITER
    assert list(lazy.lr_multiplier.scheduler.milestones[:-1]) == list(cfg.SOLVER.STEPS)
    assert lazy.dataloader.test.mapper.augmentations[0].short_edge_length == cfg.INPUT.MIN_SIZE_TEST


def _args(config_file, *opts):
    return argparse.Namespace(config_file=str(config_file), opts=list(opts), eval_only=False, resume=False)


def test_unknown_loss_name_fails_at_setup(tmp_path):
    with pytest.raises(ValueError) as e:
        setup_cfg(_args(TINY_YAML, "MODEL.CLS_LOSS.NAME", "hinge", "OUTPUT_DIR", str(tmp_path)))
    msg = str(e.value)
    assert "hinge" in msg and "retinanet head" in msg
    assert ", ".join(RETINANET_LOSSES) in msg
    assert not any(tmp_path.iterdir()), "failed before default_setup wrote anything"


def test_unknown_loss_name_in_yaml_fails(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{TINY_YAML}"\nMODEL:\n  CLS_LOSS:\n    NAME: "ce"\n')
    with pytest.raises(ValueError, match="valid names: " + ", ".join(RETINANET_LOSSES)):
        setup_cfg(_args(bad, "OUTPUT_DIR", str(tmp_path / "out")))


def test_unknown_cls_loss_key_fails(tmp_path):
    # yacs: KeyError from a file, AssertionError from a command-line list
    with pytest.raises((KeyError, AssertionError), match="MODEL.CLS_LOSS.GAMMA"):
        setup_cfg(_args(TINY_YAML, "MODEL.CLS_LOSS.GAMMA", "2.0"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{TINY_YAML}"\nMODEL:\n  CLS_LOSS:\n    DELTAA: 1.0\n')
    with pytest.raises(KeyError, match="MODEL.CLS_LOSS.DELTAA"):
        setup_cfg(_args(bad))


@pytest.mark.parametrize(
    "opts, match",
    [
        (["MODEL.CLS_LOSS.STEP", "cubic"], r"MODEL.CLS_LOSS \(NAME='ap'\): step='cubic' is not a valid step function"),
        (["MODEL.CLS_LOSS.DELTA", "0.0"], r"MODEL.CLS_LOSS \(NAME='ap'\): delta must be a finite number > 0, got 0.0"),
        (["AP_LOSS_INPUT.AUGMENTATION", "mosaic"], "default, ssd"),
        (["MODEL.CLS_LOSS.WEIGHT", "-0.5"], r"weight=-0.5 must be a finite number >= 0"),
        (["MODEL.CLS_LOSS.DELTA", "1e999"], r"delta must be a finite number > 0, got inf"),
        (["MODEL.CLS_LOSS.SIGMOID_K", "-1.0"], "sigmoid_k"),
        (["MODEL.CLS_LOSS.NAME", "ap_approx", "MODEL.CLS_LOSS.APPROX_SIGMOID_K", "0.0"], "approx_sigmoid_k=0.0 must be"),
        (["MODEL.CLS_LOSS.NAME", "ce_ohem", "MODEL.CLS_LOSS.OHEM_NEG_POS_RATIO", "0.0"], "neg_pos_ratio=0.0 must be a finite number > 0"),
    ],
)
def test_bad_values_fail(opts, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        setup_cfg(_args(TINY_YAML, *opts, "OUTPUT_DIR", str(tmp_path)))
    assert not any(tmp_path.iterdir()), "failed before default_setup wrote anything"


def test_nan_in_yaml_fails(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{TINY_YAML}"\nMODEL:\n  CLS_LOSS:\n    DELTA: .nan\n')
    with pytest.raises(ValueError, match="delta must be a finite number > 0, got nan"):
        setup_cfg(_args(bad, "OUTPUT_DIR", str(tmp_path / "out")))


def test_weight_zero_is_valid():
    cfg = load_yaml_cfg(str(TINY_YAML.relative_to(REPO)), ["MODEL.CLS_LOSS.WEIGHT", "0.0"])
    validate_cfg(cfg)


@pytest.mark.parametrize(
    "node, value, match",
    [
        ("cls_loss.weight", -1.0, "model.cls_loss: weight=-1.0 must be a finite number >= 0"),
        ("cls_loss.delta", float("inf"), "model.cls_loss: delta must be a finite number > 0, got inf"),
        ("cls_loss.images_per_ranking_set", -8, "images_per_ranking_set=-8 must be an integer >= 0"),
        ("box_reg_normalizer", "count", "valid values: ema, batch_mean"),
        ("box_reg_weight", -1.0, r"box_reg_weight \(MODEL.AP_LOSS_RETINANET.BOX_REG_WEIGHT\)=-1.0 must be a finite number >= 0"),
    ],
)
def test_lazy_bad_values_fail(node, value, match):
    """The constructors check the arguments, once; the loss node fails before anything is built."""
    cfg = LazyConfig.load(str(CONFIGS / "lazy" / "retinanet_R_50_FPN_160e_voc0712_ap.py"))
    target, _, key = node.rpartition(".")
    (cfg.model[target] if target else cfg.model)[key] = value
    with pytest.raises(ValueError, match=match):
        check_lazy_cls_loss(cfg)
        instantiate(cfg.model)


def test_box_options_checked_by_the_model():
    for opts, match in (
        (["MODEL.AP_LOSS_RETINANET.BOX_REG_WEIGHT", "-1.0"], r"BOX_REG_WEIGHT\)=-1.0 must be"),
        (["MODEL.AP_LOSS_RETINANET.BOX_REG_NORMALIZER", "count"], r"BOX_REG_NORMALIZER\)='count'; valid values: ema, batch_mean"),
    ):
        with pytest.raises(ValueError, match=match):
            build_model(load_yaml_cfg(str(TINY_YAML.relative_to(REPO)), opts))


@pytest.mark.parametrize(
    "old, new",
    [
        ("MODEL.CLS_LOSS.BOX_REG_WEIGHT", "MODEL.AP_LOSS_RETINANET.BOX_REG_WEIGHT.*MODEL.SSD.BOX_REG_WEIGHT"),
        ("MODEL.CLS_LOSS.BOX_REG_NORMALIZER", "MODEL.AP_LOSS_RETINANET.BOX_REG_NORMALIZER"),
        ("MODEL.SSD.TEST_FIXED_SIZE", "MODEL.SSD.FIXED_SIZE"),
    ],
)
def test_moved_keys_name_their_new_key(old, new, tmp_path):
    """A config or command line with a moved key fails with the new key, not "Non-existent"."""
    with pytest.raises(KeyError, match=f"{old} was renamed to {new}"):
        load_yaml_cfg(str(TINY_YAML.relative_to(REPO)), [old, "0.5"])
    top, mid, leaf = old.split(".")
    bad = tmp_path / "old.yaml"
    bad.write_text(f'_BASE_: "{TINY_YAML}"\n{top}:\n  {mid}:\n    {leaf}: 0.5\n')
    with pytest.raises(KeyError, match=f"{old} was renamed to {new}"):
        load_yaml_cfg(str(bad), [])


def test_one_config_function_without_model_code():
    """add_ap_loss_config holds every key (SSD's too), imports no model code, and each model's
    options sit in its own namespace; the SSD512 priors are written once (SSD512_PRIORS)."""
    tree = ast.parse((REPO / "ap_loss_d2" / "config.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported == {"detectron2.config"}
    from ap_loss_d2.config import SSD512_PRIORS

    cfg = add_ap_loss_config(get_cfg())
    assert add_ap_loss_config(cfg) is cfg  # idempotent
    s = cfg.MODEL.SSD
    assert (s.PRIOR_MIN_SIZES, s.PRIOR_STEPS) == (list(SSD512_PRIORS["min_sizes"]), list(SSD512_PRIORS["steps"]))
    assert (s.FOCAL_LOSS_GAMMA, s.FOCAL_LOSS_ALPHA, s.BOX_REG_WEIGHT) == (1.0, 0.25, 1.0)
    assert set(cfg.MODEL.AP_LOSS_RETINANET) == {"BOX_REG_WEIGHT", "BOX_REG_NORMALIZER"}
    assert not {"BOX_REG_WEIGHT", "BOX_REG_NORMALIZER"} & set(cfg.MODEL.CLS_LOSS)
    stock = get_cfg()
    assert stock.MODEL.RETINANET == cfg.MODEL.RETINANET  # nothing added in Detectron2's namespaces
    assert not (REPO / "ap_loss_d2" / "ssd_config.py").exists()


def test_stock_models_reject_cls_loss_name():
    """A stock model does not read MODEL.CLS_LOSS: naming a loss there is a start-up error that
    names the class to use, except the model's own loss (or leaving the key unset)."""
    stock = ["MODEL.META_ARCHITECTURE", "RetinaNet"]
    for name in ("ap", "anything"):
        cfg = load_yaml_cfg("configs/Base-RetinaNet.yaml", [*stock, "MODEL.CLS_LOSS.NAME", name])
        with pytest.raises(ValueError, match=f"NAME='{name}' would be ignored.*APLossRetinaNet"):
            validate_cfg(cfg)
    for name in ("", "focal"):
        validate_cfg(load_yaml_cfg("configs/Base-RetinaNet.yaml", [*stock, "MODEL.CLS_LOSS.NAME", name]))
    rcnn, stock = "configs/Base-RCNN-FPN.yaml", ["MODEL.ROI_HEADS.NAME", "StandardROIHeads"]
    validate_cfg(load_yaml_cfg(rcnn, stock))
    validate_cfg(load_yaml_cfg(rcnn, [*stock, "MODEL.CLS_LOSS.NAME", "ce"]))
    with pytest.raises(ValueError, match="ROI_HEADS.NAME='StandardROIHeads'.*APLossROIHeads"):
        validate_cfg(load_yaml_cfg(rcnn, [*stock, "MODEL.CLS_LOSS.NAME", "ap"]))
    with pytest.raises(ValueError, match="ProposalNetwork.*APLossRetinaNet"):
        validate_cfg(load_yaml_cfg(rcnn, ["MODEL.META_ARCHITECTURE", "ProposalNetwork", "MODEL.CLS_LOSS.NAME", "ap"]))


def test_project_base_reads_cls_loss():
    """The project's RetinaNet base trains stock focal loss through APLossRetinaNet, so that a
    config built on it and setting NAME ap trains AP-loss."""
    cfg = load_yaml_cfg("configs/Base-RetinaNet.yaml")
    assert build_model(cfg).cls_loss.name == "focal"
    cfg.MODEL.CLS_LOSS.NAME = "ap"
    validate_cfg(cfg)
    assert build_model(cfg).cls_loss.name == "ap"
