"""Network definitions. Importing this package registers every architecture."""
from . import classifiers, purifiers  # noqa: F401
