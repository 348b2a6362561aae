"""Evaluation: BraTS metrics as NumPy/SciPy (metrics) and paired tests (stats). Never imports
TensorFlow or Keras (an import-linter contract)."""
