"""Train / evaluate Detectron2 detectors with AP-loss: the logic of ``train_net.py``.

Accepts both config systems of Detectron2:

* ``.yaml`` (yacs): ``python train_net.py --config-file configs/VOC-Detection/....yaml``
  [``--eval-only MODEL.WEIGHTS path/model_final.pth``] [``--resume``] [``KEY VALUE`` ...]
* ``.py`` (LazyConfig): ``python train_net.py --config-file configs/lazy/....py``
  [``--eval-only train.init_checkpoint=path/model_final.pth``] [``--resume``] [``key=value`` ...]

``python -m ap_loss_d2.engine.train_net`` is the same command from an installed package.
:func:`main` returns the evaluation results (``{"bbox": {...}}``, or ``{dataset: ...}`` for
several test sets) of ``--eval-only`` and of the evaluation that ends a training run, so a caller
in the same process (``ap_loss_d2.studies.main_job``) needs no ``metrics.json``.

``--num-gpus N`` starts N processes: on GPUs with NCCL (Detectron2's launcher), and on a machine
without CUDA N CPU processes with Gloo (:mod:`.launch`; use MODEL.DEVICE cpu / train.device=cpu);
``--num-gpus 0`` or 1 trains in this process, as Detectron2 does.
"""
from detectron2.engine import default_argument_parser
from detectron2.evaluation import verify_results
from detectron2.utils import comm

from .checkpoint import SafeDetectionCheckpointer
from .defaults import Trainer, setup_cfg
from .launch import create_ddp_model_for, launch
from .lazy import build_lazy_model, do_test_lazy, do_train_lazy, setup_lazy_cfg, verify_lazy_results

__all__ = ["cli", "main", "main_lazy"]


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
    """Train (or with ``args.eval_only`` evaluate) as Detectron2's ``tools/train_net.py``; the
    evaluation results, ``{}`` when training evaluated nothing."""
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
    res = trainer.train()  # DefaultTrainer returns the results only with TEST.EXPECTED_RESULTS
    if res is None:
        # DefaultTrainer's EvalHook (at the end of training) stores its output here
        res = getattr(trainer, "_last_eval_results", None) or {}
    return res


def cli(argv=None):
    """``train_net.py``'s command line (Detectron2's ``default_argument_parser``)."""
    args = default_argument_parser().parse_args(argv)
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    cli()
