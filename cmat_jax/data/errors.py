"""The data pipeline's error type: one line naming the file, line or field."""


class DataError(ValueError):
    """Bad SFT data or data config (the message names the file:line or the field)."""
