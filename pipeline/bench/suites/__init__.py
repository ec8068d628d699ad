"""Built-in benchmark suites: real and generated tasks, and the checkpoints made from them."""
