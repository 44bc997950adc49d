"""The data layer's one error type."""


class DataError(ValueError):
    """Bad input data; the message names the file and the problem."""
