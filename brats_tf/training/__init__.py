"""Training: the stage-agnostic loop (loop.py), its data, checkpoints, logs (CSV and
TensorBoard), losses, optimizer and schedule, and one module of hooks per stage (stage2d,
stage3d, baselines)."""
