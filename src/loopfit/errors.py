"""The one exception type that the CLI turns into a one-line message and a non-zero exit."""


class LoopfitError(Exception):
    """A problem with the user's input (a path, a flag, a config value), reported without a traceback."""
