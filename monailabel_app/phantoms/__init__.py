"""Synthetic test data and the phantom model (NOT MedGemma, NOT anatomy)."""
