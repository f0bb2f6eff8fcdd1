"""The training engine: device and precision, tasks, the loop and its callbacks, checkpoints, the one
inference loop, prediction settings and test-time views, torchrun's rank helpers, and the time estimate.

Importing this package imports nothing heavy; each module imports PyTorch itself when it needs it.
"""
