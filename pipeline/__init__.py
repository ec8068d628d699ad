"""Distributed, training-free model merging (TSV, Iso-C/Iso-CTS and baselines) on Ray."""

__version__ = "0.1.0"
