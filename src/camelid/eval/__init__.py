"""Evaluation: tasks, runners and adapters that score camelid models."""
