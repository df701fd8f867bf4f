"""Evaluation: calibration and uncertainty metrics, plots, and the evaluation data formats."""
