"""Measurements from label maps and geometry; modality fusion."""
