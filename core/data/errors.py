"""The one exception every data loader raises for malformed input (exit code 2 at the CLI)."""


class DataError(ValueError):
    """Malformed dataset input; the message names the file and the entry so it can be fixed at the source."""
