"""`merge-pipeline` and the Ray Jobs entrypoints: argument parsing and printing only."""
