"""Training: the configs, the ensemble logic shared by both trainers (one mixin), the SFT and DPO trainers, and atomic
checkpoints."""
