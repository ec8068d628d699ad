"""Where work runs: the one Ray layer (cluster start/join, bounded submission, interrupts) and
the in-process executor. Knows nothing about merging or evaluation."""
