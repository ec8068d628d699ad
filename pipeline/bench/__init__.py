"""The built-in benchmark: suites, synthetic example checkpoints, the demo, and the runner that
merges with every method and searches alpha."""
