"""Comparison of AP-loss optimisation methods (paper Sec. 4.2.3, Fig. 8).

The classification branch of RetinaNet is trained alone (box regression off:
``MODEL.AP_LOSS_RETINANET.BOX_REG_WEIGHT 0``) with each method of ``--methods``:

* ``ap``        -- AP-loss, error-driven update (the paper's method);
* ``ap_approx`` -- AP-loss by the approximate gradient (sigmoid-smoothed AP, ``-log(AP + eps)``);
* ``ap_hinge``  -- AP-loss by the structured hinge-loss upper bound (SVM-AP);
* ``focal``     -- optional reference (stock RetinaNet focal loss).

Every ``--record-period`` iterations a hook writes the *exact* AP-loss of the training batch
(``1 - AP`` with the Heaviside step, not interpolated: ``ap_loss(..., step="heaviside",
interpolate=False)`` on the batch's detached logits and ranking labels, all images and classes
ranked together) to Detectron2's event storage as ``optim_study/ap_loss``; the run's
``metrics.json`` (Detectron2's ``JSONWriter``, same period) therefore holds every recorded value.

Part ``a`` (Fig. 8a): AP-loss vs iteration, one curve per method, all anchors kept.

Part ``b`` (Fig. 8b), ``--negative-mode proposals`` (default, the paper's setting): the imbalance
is varied by the number N of proposals per image. A frozen proposer -- a RetinaNet of the same
config trained before (``--proposal-weights``, e.g. ``output/main_job/model_final.pth`` from
``make main``), in eval mode, under ``no_grad``, not in the optimizer -- scores every anchor of each
training image by its objectness ``max_k sigmoid(logit_k)``; box regression is off, so the
proposals are anchors. Its top-N anchors united with the positive anchors are the valid samples;
every other anchor gets label -1 (ignored; anchors the matcher ignores stay ignored). Each valid
background anchor is ``K`` negative entries of the ranking (one per class); the entries of the
other classes of positive anchors stay negatives. The final AP-loss of each method is plotted
against N (``all``: every anchor, i.e. part ``a``'s run, at x = anchors per image).
``--negative-mode random`` instead keeps N random background anchors per image (re-drawn every
iteration): easy negatives, the paper's Table 8 "random sampling", labelled as such in the
outputs. The recorded AP-loss ranks the entries the loss sees; the AP-loss over all negatives is
recorded too (``optim_study/ap_loss_all_negatives``).

Snapshot runs (the paper's dashed lines, ``--snapshot-proposals N0 [--snapshot-iters M]
[--snapshot-negatives N ...]``): first AP-loss is trained with N0 for M iterations from the
default initialisation (its ``model_final.pth`` is kept), then every (method, N) -- or only the N
of ``--snapshot-negatives`` -- is run a second time initialised from it; fig8b plots them dashed.

Modules: :mod:`.model` (the study model, hook, trainer and config keys), :mod:`.runner` (one
run, the study, resume), :mod:`.report` (fig8a/fig8b JSON, markdown, PNG), :mod:`.cli` (the
command line). Training goes through the project's :class:`ap_loss_d2.engine.Trainer` (Detectron2's
``DefaultTrainer``) with a study model :class:`OptimizationStudyRetinaNet` (an
``APLossRetinaNet`` that selects the valid anchors and keeps the last batch for the hook) and the
hook :class:`ExactAPLossHook`. Runs are executed one after the other in this process.

Outputs in ``--output-dir``::

    fig8a.png / fig8a.md / fig8a.json    AP-loss curves and final values (part a)
    fig8b.png / fig8b.md / fig8b.json    final AP-loss vs proposals per image (part b)
    runs/<method>_prop<N>/ (proposals), <method>_neg<N>/ (random), <method>_negall/ (all),
    runs/<...>_snap/, runs/snapshot_ap_prop<N0>_<M>it/ (the snapshot)
                                         one Detectron2 output dir per run: config.yaml,
                                         metrics.json, study_run.json (settings),
                                         study_result.json (the recorded curve)

Resuming: a run whose ``study_result.json`` exists (same settings: config, method, N, negative
mode, iterations, seed, overrides, and the path, size and sha256 of the proposal weights and of
the initial weights of a snapshot run) is skipped; an interrupted
run continues from its last checkpoint (``SOLVER.CHECKPOINT_PERIOD`` = ``--checkpoint-period``);
checkpoints are deleted when a run finishes unless ``--keep-checkpoints``. A run directory with
other settings is refused.

"Final AP-loss" = mean of the last ``--final-fraction`` (default 20%) of the recorded values
(the per-batch value is noisy); the last value is reported too.

Default setting (CPU, minutes per run on 2 cores): the quick config
``configs/quick/retinanet_R_18_FPN_1000it_synth_ap.yaml`` (ResNet-18-FPN from scratch,
``synth_shapes_train``, 192 px, batch 8, about 4.5k anchors per image) for ``--iters 200``
(``SOLVER.STEPS``/``WARMUP_ITERS`` scaled from the config's schedule). Example::

    python -m ap_loss_d2.studies.optimization --output-dir output/optimization_study \\
        --iters 200 --methods ap ap_approx ap_hinge --negatives 100 300 1000 3000 all \\
        --proposal-weights output/main_job/model_final.pth \\
        --snapshot-proposals 300 --snapshot-iters 100

Trailing ``KEY VALUE`` pairs are config overrides applied to every run, after the study's own.
"""
from .cli import build_parser, main
from .model import (
    ANCHORS_KEY,
    AP_LOSS_ALL_KEY,
    AP_LOSS_KEY,
    NEG_KEY,
    NEGATIVE_MODES,
    ExactAPLossHook,
    OptimizationStudyRetinaNet,
    StudyTrainer,
    add_optimization_study_config,
    file_fingerprint,
    load_proposer,
)
from .report import report_fig8a, report_fig8b, snapshot_name
from .runner import (
    DEFAULT_CONFIG,
    DEFAULT_METHODS,
    DEFAULT_NEGATIVE_MODE,
    DEFAULT_NEGATIVES,
    RESULT_FILE,
    RUN_FILE,
    build_run_cfg,
    negatives_label,
    parse_negatives,
    read_metrics,
    run_name,
    run_one,
    run_study,
)

__all__ = [
    "ANCHORS_KEY",
    "AP_LOSS_ALL_KEY",
    "AP_LOSS_KEY",
    "DEFAULT_CONFIG",
    "DEFAULT_METHODS",
    "DEFAULT_NEGATIVE_MODE",
    "DEFAULT_NEGATIVES",
    "ExactAPLossHook",
    "NEGATIVE_MODES",
    "NEG_KEY",
    "OptimizationStudyRetinaNet",
    "RESULT_FILE",
    "RUN_FILE",
    "StudyTrainer",
    "add_optimization_study_config",
    "build_parser",
    "build_run_cfg",
    "file_fingerprint",
    "load_proposer",
    "main",
    "negatives_label",
    "parse_negatives",
    "read_metrics",
    "report_fig8a",
    "report_fig8b",
    "run_name",
    "run_one",
    "run_study",
    "snapshot_name",
]
