"""Differential privacy: integer noise samplers, noise calibration and privacy accounting."""
