#!/usr/bin/env python
"""Train / evaluate Detectron2 detectors with AP-loss.

Accepts both config systems of Detectron2:

* ``.yaml`` (yacs): ``python train_net.py --config-file configs/VOC-Detection/....yaml``
  [``--eval-only MODEL.WEIGHTS path/model_final.pth``] [``--resume``] [``KEY VALUE`` ...]
* ``.py`` (LazyConfig): ``python train_net.py --config-file configs/lazy/....py``
  [``--eval-only train.init_checkpoint=path/model_final.pth``] [``--resume``] [``key=value`` ...]

The training logic lives in :mod:`ap_loss_d2.engine`; this script only wires it to the command
line, like Detectron2's ``tools/train_net.py`` and ``tools/lazyconfig_train_net.py``.

``--num-gpus N`` starts N processes: on GPUs with NCCL (Detectron2's launcher), and on a machine
without CUDA N CPU processes with Gloo (``ap_loss_d2.engine.launch``; use MODEL.DEVICE cpu /
train.device=cpu).
"""
from detectron2.engine import default_argument_parser
from detectron2.evaluation import verify_results
from detectron2.utils import comm

from ap_loss_d2.engine import (
    SafeDetectionCheckpointer,
    Trainer,
    build_lazy_model,
    create_ddp_model_for,
    do_test_lazy,
    do_train_lazy,
    launch,
    setup_cfg,
    setup_lazy_cfg,
    verify_lazy_results,
)


def main_lazy(args):
    cfg = setup_lazy_cfg(args)
    if args.eval_only:
        model = create_ddp_model_for(build_lazy_model(cfg))
        SafeDetectionCheckpointer(model).load(cfg.train.init_checkpoint)
        res = do_test_lazy(cfg, model)
        if comm.is_main_process():
            verify_lazy_results(cfg, res)
        print(res)
        return res
    return do_train_lazy(cfg, args)


def main(args):
    if args.config_file.endswith(".py"):
        return main_lazy(args)
    cfg = setup_cfg(args)

    if args.eval_only:
        model = Trainer.build_model(cfg)
        SafeDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
