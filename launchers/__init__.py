"""launchers package."""
