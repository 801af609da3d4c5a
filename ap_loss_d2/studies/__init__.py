"""Every study and tool of the project, each ``python -m ap_loss_d2.studies.<name>`` with the same
flags (``--output-dir``, ``--config-file``, ``--num-gpus`` where they apply): the main job
(:mod:`.main_job`), the LR sweep, the report (Table 2), robustness (Table 3), score distribution
(Fig. 7), optimisation methods (Fig. 8, :mod:`.optimization`), cost (Fig. 9-11), Appendix A2's
example, the RoI-sampling study (Table 14). Shared helpers live in :mod:`.common`."""
