"""Slow, obviously-correct loop implementations the fast code is tested (and benchmarked) against."""
