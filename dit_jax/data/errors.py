"""The one exception type of the data package."""


class DataError(ValueError):
    """A user error in the data configuration or the data files; the message says how to fix it."""
