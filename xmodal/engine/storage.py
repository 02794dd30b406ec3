"""Paths that may be local folders or object-store URIs (``s3://``, ``gs://``): the one place that tells them apart."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from xmodal.errors import ConfigError


def is_remote(path: str | Path) -> bool:
    """Whether ``path`` is a URI (``scheme://...``) rather than a local path."""
    return "://" in str(path)


def read_text(location: str) -> str | None:
    """The text of a local file or object, or ``None`` when it does not exist."""
    if is_remote(location):
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(location)
        try:
            with fs.open_input_stream(path) as handle:
                return handle.read().decode()
        except (FileNotFoundError, OSError):
            return None
    path = Path(location)
    return path.read_text() if path.is_file() else None


def write_text(location: str, text: str) -> None:
    """Write a local file or object (parent folders created)."""
    if is_remote(location):
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(location)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as handle:
            handle.write(text.encode())
        return
    Path(location).parent.mkdir(parents=True, exist_ok=True)
    Path(location).write_text(text)


def delete_tree(location: str) -> None:
    """Remove a local folder or an object-store prefix with everything under it (nothing if absent)."""
    if is_remote(location):
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(location)
        if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
            fs.delete_dir(path)
        return
    import shutil

    shutil.rmtree(location, ignore_errors=True)


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
