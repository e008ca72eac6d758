"""Training stages: the stage kit, step data, forward wrappers, checkpoints, outputs, preference pairs, generation."""
