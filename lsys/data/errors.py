"""The one error type of the data pipeline."""


class DataError(ValueError):
    """A data set, path or data setting that cannot be used; the message names the bad value."""
