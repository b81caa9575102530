"""Preprocessing: pure functions from domain volumes to model inputs, and model outputs back to volumes."""
