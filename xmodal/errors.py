"""Exceptions shared by every layer.

Each error names the file, field or value at fault and what was expected, so a user can fix
their input without reading a traceback.
"""

from __future__ import annotations


class XmodalError(Exception):
    """Base class of every error xmodal raises on purpose."""


class DataError(XmodalError):
    """A dataset file or manifest entry is missing, corrupt or inconsistent."""


class PairingError(DataError):
    """Two modalities of one sample do not line up (CRS, bounds, shape or footprint)."""


class LeakageError(DataError):
    """Train and test tiles overlap on the ground."""


class ConfigError(XmodalError):
    """A configuration file or override is invalid."""


class TrainingError(XmodalError):
    """Training cannot go on: a non-finite loss (from the data, its statistics or the settings)."""
