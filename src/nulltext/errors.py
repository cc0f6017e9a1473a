"""User-facing errors: each carries one line that says what went wrong and what to do."""


class NulltextError(Exception):
    """Base class; the CLI prints ``str(error)`` as a single line and exits with status 2."""


class ImageError(NulltextError):
    """An input image is missing, unreadable or of an unsupported kind."""


class CaptionError(NulltextError):
    """A caption is empty or otherwise unusable."""


class ModelUnavailableError(NulltextError):
    """Model weights cannot be found locally and the hub cannot be reached."""


class FileError(NulltextError):
    """A file nulltext reads is missing, damaged or does not fit what uses it, or a folder it writes
    into cannot be written."""


class UnknownNameError(NulltextError):
    """An unknown model, method or dataset name was given."""


def user_error(error: BaseException) -> NulltextError | None:
    """The NulltextError behind ``error``, also when hydra.utils.instantiate wrapped it."""
    while error is not None and not isinstance(error, NulltextError):
        error = error.__cause__
    return error
