"""Extraction as reader -> mapper -> writer (as clip-retrieval does), wired by ``runner``."""
