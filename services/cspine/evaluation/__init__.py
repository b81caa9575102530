"""Evaluation of the whole pipeline on held-out SYNTHETIC studies, and its calibration."""
