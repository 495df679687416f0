"""Losses, train state, jitted steps, sharding, checkpoints, the training loop and the stages."""
