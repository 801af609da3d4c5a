"""MODEL.CLS_LOSS.IMAGES_PER_RANKING_SET / ``images_per_ranking_set``: layout on any process
count, start-up errors that say why, and the paper configs' 8 images per ranking set."""
import argparse
from pathlib import Path

import pytest

pytest.importorskip("detectron2")

from detectron2.config import LazyConfig, instantiate  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from ap_loss_d2.engine import get_ap_loss_cfg, setup_cfg  # noqa: E402
from train_net import check_lazy_cls_loss  # noqa: E402
from ap_loss_d2.losses.distributed import ranking_set_layout  # noqa: E402
from ap_loss_d2.losses.registry import build_cls_loss  # noqa: E402
from ap_loss_d2.losses.cls_losses import APLoss  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = REPO / "tests" / "configs" / "tiny_synth_retinanet.yaml"
LAZY_VOC_AP = REPO / "configs" / "lazy" / "retinanet_R_50_FPN_160e_voc0712_ap.py"
LAZY_FASTER_AP = REPO / "configs" / "lazy" / "faster_rcnn_R_50_FPN_1x_coco_ap.py"
PAPER_AP_YAML = sorted(
    p.relative_to(REPO).as_posix()
    for folder in ("VOC-Detection", "COCO-Detection")
    for p in (REPO / "configs" / folder).glob("retinanet_R_*.yaml")
    if not p.stem.endswith(("_focal", "_ce_ohem"))
) + [
    "configs/FasterRCNN/faster_rcnn_R_50_FPN_18k_voc0712_ap.yaml",
    "configs/FasterRCNN/faster_rcnn_R_50_FPN_1x_coco_ap.yaml",
]


def load(path, *opts):
    cfg = get_ap_loss_cfg()
    cfg.merge_from_file(str(REPO / path))
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", *opts])
    return cfg


@pytest.mark.parametrize(
    "gpus, layout",
    # 16 images per iteration, sets of 8: (sets per process, processes per set)
    [(1, (2, 1)), (2, (1, 1)), (4, (1, 2)), (8, (1, 4)), (16, (1, 8))],
)
def test_paper_set_on_any_gpu_count(gpus, layout):
    assert ranking_set_layout(8, 16 // gpus, gpus) == layout
    for path in PAPER_AP_YAML:
        loss = build_cls_loss(load(path), "retinanet" if "retinanet" in path else "roi_heads")
        if hasattr(loss, "sets"):  # the ranking losses (GHM-C and DR-loss have no ranking set)
            assert loss.sets.check(16 // gpus, gpus) == layout


def test_paper_configs_rank_8_images():
    for path in PAPER_AP_YAML:
        cfg = load(path)
        assert cfg.MODEL.CLS_LOSS.IMAGES_PER_RANKING_SET == 8, path
        assert not cfg.MODEL.CLS_LOSS.RANK_ACROSS_PROCESSES
    voc = instantiate(LazyConfig.load(str(LAZY_VOC_AP)).model)
    assert voc.cls_loss.sets.images_per_set == 8
    model = build_model(load("configs/VOC-Detection/retinanet_R_50_FPN_160e_voc0712_ap.yaml"))
    assert model.cls_loss.sets.images_per_set == 8
    faster = LazyConfig.load(str(LAZY_FASTER_AP))
    assert faster.model.roi_heads.box_predictor.cls_loss.images_per_ranking_set == 8


def _args(*opts):
    return argparse.Namespace(config_file=str(TINY_YAML), opts=list(opts), eval_only=False, resume=False)


def test_uneven_set_fails_at_setup(tmp_path):
    with pytest.raises(ValueError) as e:
        setup_cfg(_args("SOLVER.IMS_PER_BATCH", "6", "MODEL.CLS_LOSS.IMAGES_PER_RANKING_SET", "4",
                        "OUTPUT_DIR", str(tmp_path)))
    msg = str(e.value)
    assert "images_per_ranking_set=4 (MODEL.CLS_LOSS.IMAGES_PER_RANKING_SET) with 6 image(s) per process" in msg
    assert "Valid set sizes here: 0, 1, 2, 3, 6" in msg
    assert not any(tmp_path.iterdir()), "failed before default_setup wrote anything"


@pytest.mark.parametrize(
    "ims, images_per_set, world, match",
    [
        (16, 8, 8, None),
        (16, 3, 1, "neither a divisor of the 16 images of a process"),
        (4, 8, 2, "8 images need 4 processes per set, and the 2 processes do not split"),
        (12, 8, 3, "the 3 processes do not split into whole sets of 2"),
        (12, 8, 2, "neither a divisor of the 6 images"),
        (12, 8, 6, "8 images need 4 processes per set, and the 6 processes do not split"),
    ],
)
def test_set_against_processes(ims, images_per_set, world, match):
    """Checked once, where the loss is built, when the images per process are known."""
    kwargs = dict(images_per_ranking_set=images_per_set, images_per_process=ims // world, num_processes=world)
    if match is None:
        APLoss(**kwargs)
    else:
        with pytest.raises(ValueError, match=match):
            APLoss(**kwargs)
        loss = APLoss(images_per_ranking_set=images_per_set)  # layout unknown: at the first call
        with pytest.raises(ValueError, match=match):
            loss.sets.check(ims // world, world)


def test_reference_world_size_keeps_images_per_process():
    # as DefaultTrainer.auto_scale_workers: IMS_PER_BATCH 2 at REFERENCE_WORLD_SIZE 1 is 2 images per process
    cfg = load(TINY_YAML, "SOLVER.IMS_PER_BATCH", "2", "SOLVER.REFERENCE_WORLD_SIZE", "1",
               "MODEL.CLS_LOSS.IMAGES_PER_RANKING_SET", "3")
    with pytest.raises(ValueError, match=r"with 2 image\(s\) per process on 1 process"):
        build_cls_loss(cfg, "retinanet")
    cfg.SOLVER.REFERENCE_WORLD_SIZE = 4  # 2 images over 4 processes do not split: left to Detectron2
    build_cls_loss(cfg, "retinanet")


def test_both_settings_rejected():
    cfg = load(TINY_YAML, "MODEL.CLS_LOSS.RANK_ACROSS_PROCESSES", "True")
    with pytest.raises(ValueError, match="rank_across_processes=True .*images_per_ranking_set=2 both"):
        build_cls_loss(cfg, "retinanet")
    cfg.MODEL.CLS_LOSS.IMAGES_PER_RANKING_SET = 0
    build_cls_loss(cfg, "retinanet")


def test_negative_set_rejected():
    cfg = load(TINY_YAML, "MODEL.CLS_LOSS.IMAGES_PER_RANKING_SET", "-8")
    with pytest.raises(ValueError, match="images_per_ranking_set=-8 must be an integer >= 0"):
        build_cls_loss(cfg, "retinanet")


def test_losses_without_ranking_sets_ignore_the_key():
    # focal / ce_ohem configs inherit the paper's 8 from Base-APLoss-RetinaNet.yaml
    cfg = load(TINY_YAML, "MODEL.CLS_LOSS.NAME", "focal", "SOLVER.IMS_PER_BATCH", "6",
               "MODEL.CLS_LOSS.IMAGES_PER_RANKING_SET", "4")
    build_cls_loss(cfg, "retinanet")


def test_lazy_validation():
    cfg = LazyConfig.load(str(LAZY_VOC_AP))
    check_lazy_cls_loss(cfg)
    cfg.model.cls_loss.rank_across_processes = True
    with pytest.raises(ValueError, match="model.cls_loss: rank_across_processes=True"):
        check_lazy_cls_loss(cfg)
    faster = LazyConfig.load(str(LAZY_FASTER_AP))
    faster.model.roi_heads.box_predictor.cls_loss.images_per_ranking_set = -5
    with pytest.raises(ValueError, match=r"model.roi_heads.box_predictor.cls_loss: images_per_ranking_set=-5"):
        check_lazy_cls_loss(faster)
