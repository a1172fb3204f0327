"""Stages 4-5: the model factory and the Ray Train + TRL fine-tuning stages (SFT, DPO)."""
