"""Paths that may be local folders or object-store URIs (``s3://``, ``gs://``): the one place that tells them apart."""

from __future__ import annotations

from pathlib import Path


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
