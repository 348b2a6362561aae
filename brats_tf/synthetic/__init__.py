"""Synthetic BraTS-like phantoms: the generator, its anatomy and previews."""
