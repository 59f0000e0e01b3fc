"""The one exception type that the CLI turns into a one-line error."""


class FedmergeError(Exception):
    """A problem with the user's input or environment, with a message that names it."""


class DataError(FedmergeError):
    """A data file or folder is missing, malformed or inconsistent."""


class NumericalError(FedmergeError):
    """A computation produced NaN or infinite values (e.g. a diverged coefficient optimization)."""
