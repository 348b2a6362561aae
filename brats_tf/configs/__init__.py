"""Config presets (ml_collections). Each preset has a small twin for tests and demos."""
