"""Backbones shared by the families: networks that map (x, t, condition) to x-shaped outputs."""
