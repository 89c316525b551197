"""Errors users can act on. The CLI prints them without a traceback; the service maps them to 4xx."""


class AtopError(Exception):
    """Base class: a message a user can act on (bad path, bad file, bad option)."""

    exit_code = 2


class DataError(AtopError):
    """A dataset could not be read: missing path, empty folder, corrupt image, class mismatch."""


class ModelError(AtopError):
    """A model folder is missing, incomplete, corrupt or of an unknown architecture."""


class ExportError(AtopError):
    """An export could not be produced or failed its numerical verification."""


class ImageError(DataError):
    """An uploaded image cannot be used. ``http_status`` is the status the service answers with."""

    http_status = 422


class EmptyImage(ImageError):
    """The upload holds no bytes."""

    http_status = 400


class NotAnImage(ImageError):
    """The bytes are not an image in one of the accepted formats."""

    http_status = 415


class CorruptImage(ImageError):
    """An accepted format, but truncated or damaged: the pixels cannot be decoded."""

    http_status = 422


class ImageTooLarge(ImageError):
    """More pixels than the configured limit (decompression-bomb guard)."""

    http_status = 413
