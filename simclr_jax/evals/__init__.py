"""Evaluation jobs: linear evaluation, fine-tuning, kNN, the probe and the end-of-run evaluation."""
