"""Checksums of bundle files, and the record of the files this device has already checked.

`edgevlm.load` checks every bundle file's sha256 the first time it loads a bundle, then remembers each checked file
as (resolved path, size, mtime_ns, ctime_ns, sha256) in `verified.json` in the cache directory: later loads re-hash
only files whose size or times changed. ctime is part of the key because it cannot be set back by a user: a file
altered in place and given its old mtime again (`touch -d`) is hashed again. The cache is a convenience, never
trusted for more than "this exact file was hashed before": a corrupt one is ignored and rewritten, and an unwritable
cache directory only costs the hashing on the next load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "EDGEVLM_CACHE"
VERIFIED_FILE_NAME = "verified.json"
_CACHE_FORMAT = 1


def sha256_file(path: Path, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def cache_dir() -> Path:
    """edgevlm's cache directory (verified files, the demo's bundles and scenes): $EDGEVLM_CACHE, else
    $XDG_CACHE_HOME/edgevlm, else ~/.cache/edgevlm."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache") / "edgevlm"


@dataclass(frozen=True)
class FileStamp:
    """What identifies one version of a file without reading it."""

    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileStamp:
        st = path.stat()
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class VerifiedFiles:
    """The files this device hashed and found as a manifest records them, keyed by resolved path."""

    def __init__(self, path: Path | None = None):
        self.path = path or cache_dir() / VERIFIED_FILE_NAME
        self._entries: dict[str, dict] = self._read()
        self._changed = False

    def _read(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            logger.warning("ignoring the unreadable verified-files cache %s (%s); it will be rewritten", self.path, e)
            return {}
        files = data.get("files") if isinstance(data, dict) and data.get("format") == _CACHE_FORMAT else None
        if not isinstance(files, dict):
            logger.warning("ignoring the verified-files cache %s: not in the format this edgevlm writes", self.path)
            return {}
        return {path: entry for path, entry in files.items() if isinstance(entry, dict)}

    def is_verified(self, file: Path, sha256: str) -> bool:
        """True if `file`, as it is now, was hashed before and had `sha256`."""
        entry = self._entries.get(str(file.resolve()))
        if entry is None or entry.get("sha256") != sha256:
            return False
        stamp = FileStamp.of(file)
        return [entry.get("size"), entry.get("mtime_ns"), entry.get("ctime_ns")] == [stamp.size, stamp.mtime_ns, stamp.ctime_ns]  # fmt: skip

    def record(self, file: Path, stamp: FileStamp, sha256: str) -> None:
        """Remember that `file`, at `stamp` (taken before it was hashed), has `sha256`."""
        self._entries[str(file.resolve())] = {"size": stamp.size, "mtime_ns": stamp.mtime_ns, "ctime_ns": stamp.ctime_ns, "sha256": sha256}  # fmt: skip
        self._changed = True

    def save(self) -> None:
        """Write the cache atomically, dropping files that no longer exist; a failure only logs a warning."""
        if not self._changed:
            return
        entries = {path: entry for path, entry in self._entries.items() if os.path.isfile(path)}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump({"format": _CACHE_FORMAT, "files": entries}, f, indent=1)
                os.replace(tmp, self.path)
            finally:
                Path(tmp).unlink(missing_ok=True)
        except OSError as e:
            logger.warning("could not write the verified-files cache %s (%s): the next load hashes the bundle again; "
                           "set %s to a writable directory to keep it", self.path, e, CACHE_DIR_ENV)  # fmt: skip
            return
        self._changed = False
