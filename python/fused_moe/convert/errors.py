"""The converter's one error type for bad input."""


class ConversionError(ValueError):
    """Bad input to the converter: a bad source, bad options or an existing
    destination. The message is one line that names the file, tensor or shape
    at fault; the command line prints it without a traceback."""
