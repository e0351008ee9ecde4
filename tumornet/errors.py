"""One exception type for bad input, so callers can catch it and print one clear line."""


class InputError(ValueError):
    """Input that cannot be used: the message names the file, row or key and what is wrong."""
