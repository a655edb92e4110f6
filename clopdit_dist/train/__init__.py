"""The one training loop every stage uses (DeepSpeed ZeRO, checkpoints, EMA, tracking)."""
