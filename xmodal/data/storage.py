"""Paths that may be local folders or object-store URIs (``s3://``, ``gs://``): the one place that tells them apart.

Every layer reads and writes through these helpers, so a data root, a run's storage and a sweep
folder may each be a local folder or a bucket prefix. Object stores are reached through
``pyarrow.fs``, which reads its endpoint and credentials from the environment of the process
(``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` or
``AWS_ENDPOINT_URL_S3`` for an S3-compatible server, ``GOOGLE_APPLICATION_CREDENTIALS``...), or
from ``?endpoint_override=...&scheme=http`` in the URI. On a cluster those variables must be set
on every node (or in the job's runtime env), since Ray Data and Train tasks read and write there.

``engine.storage`` adds what only runs need (Ray job working dirs) on top of this module.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from xmodal.errors import ConfigError

CACHE_ENV = "XMODAL_CACHE"  # local folder for copies of object-store files (default ~/.cache/xmodal)


def is_remote(path: str | Path) -> bool:
    """Whether ``path`` is a URI (``scheme://...``) rather than a local path."""
    return "://" in str(path)


def join(base: str | Path, *parts: str) -> str:
    """``base`` with ``parts`` appended: ``/``-joined for a URI (a query string stays at the end),
    a local path otherwise."""
    if not is_remote(base):
        return str(Path(base).joinpath(*parts))
    location, _, query = str(base).partition("?")
    tail = "/".join(p.strip("/") for p in parts if p.strip("/") not in ("", "."))
    joined = location.rstrip("/") + ("/" + tail if tail else "")
    return joined + (f"?{query}" if query else "")


def filesystem(uri: str) -> tuple[Any, str]:
    """The ``pyarrow.fs`` filesystem of ``uri`` and the path inside it.

    Raises:
        ConfigError: Naming the URI, when its scheme has no filesystem or it cannot be parsed.
    """
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except (ValueError, OSError, TypeError) as exc:
        raise ConfigError(f"{uri}: not a storage URI pyarrow can open ({_first_line(exc)}); expected s3://bucket/path, gs://bucket/path or a local path") from None


def check_reachable(location: str, key: str) -> None:
    """Refuse an object-store location whose bucket does not exist or that the credentials cannot list.

    A local path passes (folders are made when written). Cheap: one listing request.

    Raises:
        ConfigError: Naming ``key``, the URI and the store's own error.
    """
    if not is_remote(location):
        return
    import pyarrow.fs

    fs, path = filesystem(location)
    bucket = path.split("/", 1)[0]
    try:
        if fs.get_file_info(bucket).type == pyarrow.fs.FileType.NotFound:
            raise ConfigError(f"{key}={location!r}: bucket {bucket!r} does not exist (create it, or check the name and the endpoint)")
        fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=False, allow_not_found=True))
    except OSError as exc:
        raise ConfigError(
            f"{key}={location!r}: the object store refused it ({_first_line(exc)}); check that the bucket exists and "
            "that this process (and every Ray node) has credentials for it: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
            "(AWS_ENDPOINT_URL for an S3-compatible server) or an instance role for s3://, "
            "GOOGLE_APPLICATION_CREDENTIALS or a service account for gs://"
        ) from None


# pyarrow filesystem type -> the URI scheme that names its paths
_SCHEMES = {"s3": "s3", "gcs": "gs", "abfs": "abfs", "hdfs": "hdfs"}


def location_of(fs: Any, path: str) -> str:
    """The location (local path or URI) of ``path`` inside the ``pyarrow.fs`` filesystem ``fs``:
    what Ray's ``Checkpoint.path`` means, given its ``Checkpoint.filesystem`` (which Ray gives
    without a scheme: ``bucket/runs/...``)."""
    scheme = _SCHEMES.get(getattr(fs, "type_name", "local"))
    return f"{scheme}://{path.lstrip('/')}" if scheme else path


def exists(location: str) -> bool:
    """Whether a local file/folder or an object/prefix exists."""
    if not is_remote(location):
        return Path(location).exists()
    import pyarrow.fs

    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def read_text(location: str) -> str | None:
    """The text of a local file or object, or ``None`` when it does not exist."""
    if is_remote(location):
        fs, path = filesystem(location)
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
        fs, path = filesystem(location)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as handle:
            handle.write(text.encode())
        return
    Path(location).parent.mkdir(parents=True, exist_ok=True)
    Path(location).write_text(text)


def delete_tree(location: str) -> None:
    """Remove a local folder or an object-store prefix with everything under it, or one file or
    object (nothing if absent)."""
    if is_remote(location):
        import pyarrow.fs

        fs, path = filesystem(location)
        kind = fs.get_file_info(path).type
        if kind == pyarrow.fs.FileType.File:
            fs.delete_file(path)
        elif kind != pyarrow.fs.FileType.NotFound:
            fs.delete_dir(path)
        return
    if Path(location).is_file():
        Path(location).unlink()
        return
    shutil.rmtree(location, ignore_errors=True)


def download(uri: str, target: str | Path) -> bool:
    """Copy one object to a local file (replacing it); ``False`` when the object does not exist."""
    import pyarrow.fs

    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return False
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    with fs.open_input_stream(path) as source, open(partial, "wb") as sink:
        shutil.copyfileobj(source, sink, 2**20)
    partial.replace(target)  # never a half-copied file under the real name
    return True


def upload(source: str | Path, uri: str) -> None:
    """Copy a local file, or a local folder with everything in it, to ``uri`` (objects replaced,
    none deleted)."""
    import pyarrow.fs

    source = Path(source)
    if not source.exists():
        return
    fs, path = filesystem(uri)
    if source.is_dir():
        fs.create_dir(path, recursive=True)
    else:
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pyarrow.fs.copy_files(str(source.resolve()), path, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs)


def cache_folder(uri: str) -> Path:
    """A local folder that stands for ``uri`` on this machine (``$XMODAL_CACHE``, else
    ``~/.cache/xmodal``): where copies of its small files are kept. The same URI always gets
    the same folder; nothing in it is the only copy of anything."""
    location = uri.partition("?")[0]
    scheme, _, rest = location.partition("://")
    readable = "".join(c if c.isalnum() or c in "-_." else "_" for c in rest.strip("/").replace("/", "_"))[-80:]
    digest = hashlib.sha256(uri.encode()).hexdigest()[:12]
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "xmodal").expanduser()
    return root / scheme / f"{readable}-{digest}"


def gdal_options(path: str) -> dict[str, str]:
    """GDAL settings that let rasterio read ``path`` (an ``s3://`` URI, read through ``/vsis3/``)
    from the S3-compatible server the environment names: GDAL does not read
    ``AWS_ENDPOINT_URL``, it wants the host in ``AWS_S3_ENDPOINT``, ``AWS_HTTPS`` and path-style
    addressing. Empty for local paths, other schemes, AWS itself, or when ``AWS_S3_ENDPOINT`` is set."""
    if not str(path).startswith("s3://") or os.environ.get("AWS_S3_ENDPOINT"):
        return {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return {}
    scheme, _, host = endpoint.partition("://") if "://" in endpoint else ("https", "", endpoint)
    return {"AWS_S3_ENDPOINT": host.rstrip("/"), "AWS_HTTPS": "NO" if scheme == "http" else "YES", "AWS_VIRTUAL_HOSTING": "FALSE"}


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
