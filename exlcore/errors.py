"""The one exception type the API raises for bad input; the CLI prints its message as one line."""


class ExlError(Exception):
    """A user-facing error: the message names the file, tensor or option and says what to do."""
