"""Benchmarks that print figures and ratios: ``sertune bench search|scale|faults``."""
