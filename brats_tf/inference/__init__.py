"""Inference: full-volume prediction (predict), 2D feature channels (features), the segment
pipeline (pipeline), [S] baselines (baselines) and voting (ensemble)."""
