"""The one exception type raised by the weights readers."""


class WeightsError(ValueError):
    """A weights file or source that cannot be used; the message names the file or source."""
