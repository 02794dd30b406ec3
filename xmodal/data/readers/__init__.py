"""Dataset readers. Importing this package registers every built-in reader."""

from xmodal.data.readers import native  # noqa: F401
from xmodal.data.readers import spacenet6  # noqa: F401
from xmodal.data.readers import so2sat  # noqa: F401
from xmodal.data.readers import ssl4eo  # noqa: F401
from xmodal.data.readers import sen12ms  # noqa: F401
from xmodal.data.readers import dfc2020  # noqa: F401
from xmodal.data.readers import scenes  # noqa: F401
from xmodal.data.readers.base import (
    READERS,
    IndexResult,
    LoadOptions,
    Reader,
    Skipped,
    detect_reader,
    get_reader,
    register_reader,
)

__all__ = [
    "READERS",
    "IndexResult",
    "LoadOptions",
    "Reader",
    "Skipped",
    "detect_reader",
    "get_reader",
    "register_reader",
]
