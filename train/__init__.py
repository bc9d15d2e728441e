"""Training stages (backbone, stage1 CTM, stage2 Meta-GRPO, router calibration)."""
