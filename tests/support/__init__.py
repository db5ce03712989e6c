"""Helpers shared by the test modules (one of each: specs, trainer launches, store access, waiting)."""
