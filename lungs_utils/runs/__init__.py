"""Runs: a classification run and a lung-segmentation run from params (one split or k folds), the
papermill runner behind ``lungs run`` / ``lungs pipeline`` with its provenance, and the torchrun launcher."""
