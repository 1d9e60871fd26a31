"""Sweeps: sweep files, Optuna-backed trial queues with leases, and the workers that drain them."""
