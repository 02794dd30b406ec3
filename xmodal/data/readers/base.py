"""Reader interface and registry.

A reader knows one on-disk layout. It does two things:

* :meth:`Reader.index` scans a dataset folder and returns a :class:`~xmodal.data.manifest.Manifest`
  of pairs, plus the pairs it could not make and why;
* :meth:`Reader.load` turns one manifest record into a :class:`~xmodal.data.sample.PairedSample`.

Readers register themselves by name with :func:`register_reader`; ``dataset.json`` stores that
name so the pipeline can load any prepared dataset without knowing its format.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from xmodal.data.manifest import DatasetInfo, Manifest
from xmodal.data.sample import PairedSample
from xmodal.errors import DataError


@dataclass
class Skipped:
    """A pair a reader could not make."""

    item: str
    reason: str


@dataclass
class IndexResult:
    """What :meth:`Reader.index` found."""

    manifest: Manifest
    skipped: list[Skipped] = field(default_factory=list)


@dataclass(frozen=True)
class LoadOptions:
    """Which label layers become ``mask`` and ``noisy_mask`` of the loaded sample."""

    mask_layer: str | None = None
    noisy_layer: str | None = None


class Reader(ABC):
    """One dataset layout. Subclasses set ``name`` and ``description`` and register themselves."""

    name: ClassVar[str]
    description: ClassVar[str]
    # Folder layout shown by ``xmodal data inspect`` and the README.
    layout: ClassVar[str] = ""
    # Raised when what ``index`` writes changes (footprints, splits, classes, no-data rules): an
    # index a raw ``data.root`` keeps in its prepared folder is then made again, statistics too.
    version: ClassVar[int] = 1
    # Suffixes of single files this reader takes as its root (a ``scenes.yaml`` listing); most
    # readers take folders only.
    file_suffixes: ClassVar[tuple[str, ...]] = ()

    @classmethod
    @abstractmethod
    def detect(cls, root: Path) -> bool:
        """True when ``root`` holds this reader's layout (cheap: look at names, not pixels)."""

    @classmethod
    @abstractmethod
    def index(cls, root: Path, **options: Any) -> IndexResult:
        """Scan ``root`` and build the manifest of pairs."""

    @classmethod
    @abstractmethod
    def load(cls, record: dict[str, Any], info: DatasetInfo, data_root: Path, options: LoadOptions) -> PairedSample:
        """Read one record into the paired-sample contract (no-data as NaN / invalid pixels)."""


READERS: dict[str, type[Reader]] = {}


def register_reader(cls: type[Reader]) -> type[Reader]:
    """Class decorator adding a reader to the registry under ``cls.name``."""
    if cls.name in READERS and READERS[cls.name] is not cls:
        raise ValueError(f"reader name {cls.name!r} is registered twice")
    READERS[cls.name] = cls
    return cls


def get_reader(name: str, source: str | None = None) -> type[Reader]:
    """The reader registered as ``name`` (``source``: the file that names it, for the error)."""
    _import_builtin_readers()
    try:
        return READERS[name]
    except (KeyError, TypeError):
        where = f"{source}: reader={name!r}" if source else f"reader {name!r}"
        raise DataError(f"{where} is not a known reader; expected one of {sorted(READERS)}") from None


def detect_reader(root: str | Path) -> type[Reader]:
    """The reader whose layout ``root`` holds (a file goes to the readers whose ``file_suffixes`` name it).

    Raises:
        DataError: No reader (or more than one) recognises the folder, or no reader takes the file.
    """
    _import_builtin_readers()
    root = Path(root)
    if root.is_file():
        found = [r for r in READERS.values() if root.suffix.lower() in r.file_suffixes and r.detect(root)]
        if len(found) == 1:
            return found[0]
        suffixes = sorted({suffix for r in READERS.values() for suffix in r.file_suffixes})
        raise DataError(f"{root}: neither a folder nor a file a reader takes (expected a dataset folder or a {'/'.join(suffixes)} listing)")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    found = [reader for reader in READERS.values() if reader.detect(root)]
    if not found:
        raise DataError(f"{root}: no known dataset layout found; supported: {sorted(READERS)}")
    if len(found) > 1:
        raise DataError(f"{root}: matches several layouts {[r.name for r in found]}; point at a more specific folder")
    return found[0]


def _import_builtin_readers() -> None:
    # Importing the package registers every built-in reader; the packed store registers its own.
    import xmodal.data.readers  # noqa: F401
    import xmodal.data.store  # noqa: F401
