"""Evaluation: metrics and tasks."""
