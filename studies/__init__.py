"""Every study and tool of the project, each ``python -m studies.<name>`` with one
argument parser (:func:`.common.study_argument_parser`: ``--output-dir`` defaulting to
``output/<name>``, ``--config-file`` and ``--num-gpus`` where they apply, trailing ``KEY VALUE``
config overrides): the main job (:mod:`.main_job`), the LR sweep, the report (Table 2),
robustness (Table 3), score distribution (Fig. 7), optimisation methods (Fig. 8,
:mod:`.optimization`), cost (Fig. 9-11), training curves (Fig. 6), detections side by side
(Fig. 5 / 12), Appendix A2's example, the RoI-sampling study (Table 14). Shared helpers live in
:mod:`.common`; the image perturbations shared by the robustness study and its attacks in
:mod:`.perturbations`."""
