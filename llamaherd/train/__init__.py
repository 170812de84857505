"""Pretraining: the trainer loop, checkpoints with exact resume, metrics, and how parallelism is applied."""
