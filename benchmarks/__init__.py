"""Benchmarks: speed of the project code as ratios against straightforward reference ports."""
