"""MODEL.CLS_LOSS.IMAGES_PER_RANKING_SET / ``images_per_ranking_set``: layout on any process
count, start-up errors that say why, and the paper configs' 8 images per ranking set."""
import argparse
from pathlib import Path

import pytest

pytest.importorskip("detectron2")

from detectron2.config import LazyConfig, instantiate  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from ap_loss_d2.engine import get_ap_loss_cfg, setup_cfg, validate_cfg, validate_lazy_cfg  # noqa: E402
from ap_loss_d2.losses.distributed import ranking_set_layout  # noqa: E402

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
        validate_cfg(load(path), world_size=gpus)  # no error


def test_paper_configs_rank_8_images():
    for path in PAPER_AP_YAML:
        cfg = load(path)
        assert cfg.MODEL.CLS_LOSS.IMAGES_PER_RANKING_SET == 8, path
        assert not cfg.MODEL.CLS_LOSS.RANK_ACROSS_PROCESSES
    voc = instantiate(LazyConfig.load(str(LAZY_VOC_AP)).model)
    assert voc.images_per_ranking_set == 8
    assert build_model(load("configs/VOC-Detection/retinanet_R_50_FPN_160e_voc0712_ap.yaml")).images_per_ranking_set == 8
    faster = LazyConfig.load(str(LAZY_FASTER_AP))
    assert faster.model.roi_heads.box_predictor.images_per_ranking_set == 8


def _args(*opts):
    return argparse.Namespace(config_file=str(TINY_YAML), opts=list(opts), eval_only=False, resume=False)


def test_uneven_set_fails_at_setup(tmp_path):
    with pytest.raises(ValueError) as e:
        setup_cfg(_args("SOLVER.IMS_PER_BATCH", "6", "MODEL.CLS_LOSS.IMAGES_PER_RANKING_SET", "4",
                        "OUTPUT_DIR", str(tmp_path)))
    msg = str(e.value)
    assert "MODEL.CLS_LOSS.IMAGES_PER_RANKING_SET=4" in msg and "SOLVER.IMS_PER_BATCH=6" in msg
    assert "Valid set sizes here: 0, 1, 2, 3, 6" in msg
    assert not any(tmp_path.iterdir()), "failed before default_setup wrote anything"


@pytest.mark.parametrize(
    "ims, images_per_set, world, match",
    [
        (16, 8, 32, None),  # 16 images do not split over 32 processes: Detectron2 says so
        (16, 8, 8, None),
        (16, 3, 1, "neither a divisor of the 16 images of a process"),
        (4, 8, 2, "8 images need 4 processes per set, and the 2 processes do not split"),
        (12, 8, 3, "the 3 processes do not split into whole sets of 2"),
        (12, 8, 2, "neither a divisor of the 6 images"),
        (12, 8, 6, "8 images need 4 processes per set, and the 6 processes do not split"),
    ],
)
def test_set_against_processes(ims, images_per_set, world, match):
    cfg = load(TINY_YAML, "SOLVER.IMS_PER_BATCH", str(ims),
               "MODEL.CLS_LOSS.IMAGES_PER_RANKING_SET", str(images_per_set))
    if match is None:
        validate_cfg(cfg, world_size=world)
    else:
        with pytest.raises(ValueError, match=match):
            validate_cfg(cfg, world_size=world)


def test_reference_world_size_keeps_images_per_process():
    # Detectron2 scales IMS_PER_BATCH to 2 x 4 / 1 = 8 on 4 processes: 2 images per process
    cfg = load(TINY_YAML, "SOLVER.IMS_PER_BATCH", "2", "SOLVER.REFERENCE_WORLD_SIZE", "1",
               "MODEL.CLS_LOSS.IMAGES_PER_RANKING_SET", "3")
    with pytest.raises(ValueError, match=r"IMS_PER_BATCH=2 \(scaled to 8 by SOLVER.REFERENCE_WORLD_SIZE=1\)"):
        validate_cfg(cfg, world_size=4)
    cfg.MODEL.CLS_LOSS.IMAGES_PER_RANKING_SET = 4  # 2 processes x 2 images
    validate_cfg(cfg, world_size=4)


def test_both_settings_rejected():
    cfg = load(TINY_YAML, "MODEL.CLS_LOSS.RANK_ACROSS_PROCESSES", "True")
    with pytest.raises(ValueError, match="RANK_ACROSS_PROCESSES=True .*IMAGES_PER_RANKING_SET=2 both"):
        validate_cfg(cfg, world_size=1)
    cfg.MODEL.CLS_LOSS.IMAGES_PER_RANKING_SET = 0
    validate_cfg(cfg, world_size=2)


def test_negative_set_rejected():
    cfg = load(TINY_YAML, "MODEL.CLS_LOSS.IMAGES_PER_RANKING_SET", "-8")
    with pytest.raises(ValueError, match="IMAGES_PER_RANKING_SET=-8 must be an integer >= 0"):
        validate_cfg(cfg, world_size=1)


def test_losses_without_ranking_sets_ignore_the_key():
    # focal / ce_ohem configs inherit the paper's 8 from Base-APLoss-RetinaNet.yaml
    cfg = load(TINY_YAML, "MODEL.CLS_LOSS.NAME", "focal", "SOLVER.IMS_PER_BATCH", "6",
               "MODEL.CLS_LOSS.IMAGES_PER_RANKING_SET", "4")
    validate_cfg(cfg, world_size=1)


def test_lazy_validation():
    cfg = LazyConfig.load(str(LAZY_VOC_AP))
    for world in (1, 2, 4, 8):
        validate_lazy_cfg(cfg, world_size=world)
    cfg.dataloader.train.total_batch_size = 12
    with pytest.raises(ValueError, match=r"model.images_per_ranking_set=8 with "
                       r"dataloader.train.total_batch_size=12 on 1 process"):
        validate_lazy_cfg(cfg, world_size=1)
    cfg.model.images_per_ranking_set = 0
    cfg.model.rank_across_processes = True
    validate_lazy_cfg(cfg, world_size=1)
    cfg.model.images_per_ranking_set = 4
    with pytest.raises(ValueError, match="model.rank_across_processes=True"):
        validate_lazy_cfg(cfg, world_size=1)

    faster = LazyConfig.load(str(LAZY_FASTER_AP))
    validate_lazy_cfg(faster, world_size=8)
    faster.model.roi_heads.box_predictor.images_per_ranking_set = 5
    with pytest.raises(ValueError, match=r"model.roi_heads.box_predictor.images_per_ranking_set=5"):
        validate_lazy_cfg(faster, world_size=2)
