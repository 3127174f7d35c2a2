"""Speed and memory benchmarks of the loss and the training step (README.md beside this
file), run as modules from the repository root: ``python -m bench.loss_speed``."""
