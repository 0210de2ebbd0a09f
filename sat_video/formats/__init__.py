"""Checkpoint formats: SAT checkpoints and SAT LoRA, diffusers both ways, widening T2V weights for I2V."""
