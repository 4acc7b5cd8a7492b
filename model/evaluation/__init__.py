"""Evaluation: continual-learning metrics, baselines and comparisons, grading, knowledge incorporation, long context."""
