"""Evaluation: the CLIP vision model, task data and heads, actor pools, alpha search."""
