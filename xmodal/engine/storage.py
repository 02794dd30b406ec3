"""Run outputs and object storage: Ray job working dirs told apart, and the object-store helpers of
:mod:`xmodal.data.storage` (the one place that tells paths and URIs apart) for the engine and sweeps."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

# The object-store primitives live with the data layer (which reads data roots through them);
# the engine and sweeps import them from here with what only runs need.
from xmodal.data.storage import (  # noqa: F401 (re-exported)
    cache_folder, check_reachable, delete_tree, download, exists, filesystem, is_remote, join, location_of, read_text, upload, write_text,
)
from xmodal.errors import ConfigError

# `ray job submit --working-dir` unpacks the job's code into <temp>/session_*/runtime_resources/
# working_dir_files/_ray_pkg_<hash of the upload>: a new folder for every change to the code, deleted
# with the session.
_JOB_WORKING_DIR = re.compile(r"^.*/runtime_resources/working_dir_files/_ray_pkg_[0-9a-f]+(?=/|$)")
JOB_WORKING_DIR_MARK = "<job working dir>"


def job_working_dir(path: str | Path) -> str | None:
    """The Ray job working dir ``path`` lies in (an unpacked ``--working-dir`` upload), or ``None``."""
    found = _JOB_WORKING_DIR.match(str(path))
    return found.group(0) if found else None


def portable_paths(value: Any) -> Any:
    """``value`` (a plain config tree) with every path inside a Ray job working dir written relative to it.

    Two submissions of the same job differ in that folder's name whenever the code changed; a
    resumed run or sweep is the same one if its paths are the same relative to it.
    """
    if isinstance(value, dict):
        return {key: portable_paths(inner) for key, inner in value.items()}
    if isinstance(value, list):
        return [portable_paths(inner) for inner in value]
    if isinstance(value, str):
        return _JOB_WORKING_DIR.sub(JOB_WORKING_DIR_MARK, value)
    return value


def refuse_job_scratch(path: str, key: str) -> None:
    """Refuse an output folder inside a Ray job's working dir, which Ray deletes with its session.

    Raises:
        ConfigError: Naming ``key``, the folder, and what to give instead.
    """
    if is_remote(path):
        return
    scratch = job_working_dir(Path(path).expanduser().resolve())
    if scratch is not None:
        raise ConfigError(
            f"{key}={path!r} lies inside this Ray job's working dir ({scratch}), which Ray deletes with its session "
            "and replaces at every code change: give an absolute path on storage every node shares, or an s3:// / gs:// URI"
        )
