"""Infer tasks of the app's models."""
