"""Training: the stage-agnostic loop (loop.py), its data, checkpoints, losses, optimizer and
schedule, and one module of hooks per stage (stage2d, stage3d, baselines)."""
