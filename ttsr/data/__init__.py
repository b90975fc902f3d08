"""Data: TTSR degradation, synthetic references, datasets and the Lightning DataModule."""
