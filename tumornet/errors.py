"""One exception type for bad input, so callers can catch it and print one clear line."""


class InputError(ValueError):
    """Input that cannot be used: the message names the file, row or key and what is wrong.

    `kind` classifies it for the nightly job's errors table (e.g. missing_file, not_nifti,
    truncated, bad_shape, non_finite, header_size, mismatch, empty_mask, invalid_row)."""

    def __init__(self, message: str, *, kind: str = "invalid_input"):
        super().__init__(message)
        self.kind = kind
