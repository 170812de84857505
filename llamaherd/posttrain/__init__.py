"""Post-training: SFT, reward model, rejection sampling, DPO, PPO, LoRA."""
