"""User-facing errors: anything the user can fix (a path, a flag, a prompt) raises GemmaspecError.

The CLI and the server turn it into one readable line; everything else is a bug and keeps its traceback.
"""


class GemmaspecError(Exception):
    """A problem with the user's input or files, reported as one line without a traceback."""


class ModelFileError(GemmaspecError):
    """A model file or folder is missing, unreadable, corrupt or of an unsupported kind."""


class PromptTooLongError(GemmaspecError):
    """The prompt (plus the requested tokens) does not fit in the model's context."""
