"""The package's one error type for bad checkpoints and bad converter input."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as it claims to be, or bad options to
    the converter: a bad source, an existing destination, a packed format this
    package cannot read. The message is one line that names the file, tensor
    or shape at fault; the command line prints it without a traceback."""


# The name the converter's API has always raised; the same class.
ConversionError = CheckpointError


class UnsupportedError(ValueError):
    """A model, module or quantization the fused path does not take. The
    message names the module and what is supported."""


# What the command line reports in one line (no traceback unless --debug):
# the user's input is at fault, not the program.
EXPECTED_ERRORS = (CheckpointError, UnsupportedError)
