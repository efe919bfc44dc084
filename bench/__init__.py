"""focal_cuda's bench suite: `python -m bench --help`."""
