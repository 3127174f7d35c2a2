"""Where the study keeps its files, named once.

Every script of the study runs from the repository root as a module
(``python -m experiments.otr_vs_sft.run``); the results, the run cache and the map the
plugin ships are found from here, and result files name their sources by ``RESULTS_REL``
(relative to the repository root, so they read the same on every machine).
"""

from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
RESULTS_REL = "experiments/otr_vs_sft/results"
RESULTS = os.path.join(ROOT, *RESULTS_REL.split("/"))
PACKAGE = "experiments.otr_vs_sft"  # what ``python -m`` runs the scripts as
