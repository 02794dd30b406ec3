"""Imports every built-in method so that it registers itself. Add one line per new method."""

from xmodal.methods import supervised  # noqa: F401
from xmodal.methods import kd  # noqa: F401
