"""Studies reproducing the paper's analyses (robustness, score distribution, cost, report;
optimisation methods of Fig. 8: :mod:`.optimization`; Appendix A2's example: :mod:`.a2_example`)."""
