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
