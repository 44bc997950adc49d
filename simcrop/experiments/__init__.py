"""Experiment drivers built on the library (the trainer, the evaluation tasks); entry points, imported by nothing."""
