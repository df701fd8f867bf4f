"""Inference: :class:`~trl_renyi.inference.ensemble.RenyiEnsemble`, the single-model baseline, scoring, choices,
generation and the uncertainty decomposition."""
