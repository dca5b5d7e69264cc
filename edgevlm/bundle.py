"""The bundle: one folder with a manifest (`edgevlm.json`, see `edgevlm.contract.manifest`), a vision ONNX graph and a GGUF
language model. Bundles are written into a temporary sibling directory and renamed into place at the
end, so a folder that carries a manifest is always complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .contract.manifest import MANIFEST_NAME, FileEntry, Manifest
from .errors import BundleError
from .integrity import FileStamp, VerifiedFiles, sha256_file

logger = logging.getLogger(__name__)

MAX_MANIFEST_BYTES = 1 << 20  # a manifest is a few KB (the tokenizer and chat template live in the GGUF)


@dataclass(frozen=True)
class Bundle:
    """An exported bundle on disk. `Bundle.open` checks the manifest and that every file it needs is listed and
    present with its recorded size; `verify` checks their sha256."""

    path: Path
    manifest: Manifest

    @classmethod
    def open(cls, path: str | os.PathLike) -> Bundle:
        path = Path(path)
        manifest_path = path / MANIFEST_NAME
        if not path.is_dir():
            raise BundleError(f"{path} is not a bundle directory (it does not exist or is a file); "
                              "export one with `edgevlm export MODEL -o DIR`.")  # fmt: skip
        if not manifest_path.is_file():
            raise BundleError(f"{path} has no {MANIFEST_NAME}: it is not an edgevlm bundle, or its export did not "
                              "finish. Export it again with `edgevlm export MODEL -o DIR`.")  # fmt: skip
        manifest = Manifest.from_dict(_read_manifest_json(manifest_path), where=str(manifest_path))
        bundle = cls(path, manifest)
        bundle.check_listed()
        bundle.check_sizes()
        return bundle

    def file(self, name: str) -> Path:
        return self.path / name

    def check_listed(self) -> None:
        """Every file the runtime opens is in the manifest's `files`, with the ONNX external data file of a graph
        that has one (onnxruntime opens `<graph>.data` next to it by itself)."""
        data_files = [external_data_name(name) for name in self.manifest.referenced_files()]
        unlisted = [name for name in data_files if (self.path / name).exists() and name not in self.manifest.files]
        if unlisted:
            raise BundleError(f"bundle {self.path} has {', '.join(unlisted)}, which {MANIFEST_NAME} does not list "
                              "with a size and sha256: the manifest was changed. Copy the whole bundle folder again.")  # fmt: skip

    def check_sizes(self) -> None:
        """Fast completeness check: every file exists with the size the manifest records."""
        for name, entry in self.manifest.files.items():
            file = self.path / name
            if not file.exists():
                raise BundleError(f"bundle {self.path} is missing {name}; copy the whole bundle folder again.")
            if not file.is_file():
                raise BundleError(f"bundle file {file} is not a regular file; copy the whole bundle folder again.")
            size = file.stat().st_size
            if size != entry.size:
                raise BundleError(
                    f"bundle file {file} has {size} bytes, the manifest expects {entry.size}: it is truncated or "
                    "was changed. Copy the whole bundle folder again."
                )

    def verify(self, *, cached: bool = False) -> dict[str, str]:
        """Check the size and sha256 of every file; returns {file: "ok"} or raises BundleError naming the file.

        With `cached`, files this device already verified and that did not change since (same size, mtime and
        ctime; see `edgevlm.integrity`) are not read again and report "ok (verified before)". Every file hashed is
        remembered for later cached checks.
        """
        self.check_sizes()
        verified = VerifiedFiles()
        results = {}
        try:
            for name, entry in self.manifest.files.items():
                file = self.path / name
                if cached and verified.is_verified(file, entry.sha256):
                    results[name] = "ok (verified before)"
                    continue
                stamp = FileStamp.of(file)
                actual = sha256_file(file)
                if actual != entry.sha256:
                    raise BundleError(
                        f"bundle file {file} fails its sha256 check (the manifest records {entry.sha256[:16]}..., the "
                        f"file has {actual[:16]}...): it is corrupt or was altered. Copy the whole bundle folder again."
                    )
                if FileStamp.of(file) == stamp:  # not changed while it was read
                    verified.record(file, stamp, actual)
                results[name] = "ok"
        finally:
            verified.save()
        return results


def external_data_name(graph_file: str) -> str:
    """The external data file of an ONNX graph whose weights do not fit inside it (written by the exporter)."""
    return graph_file + ".data"


def _read_manifest_json(manifest_path: Path) -> object:
    try:
        size = manifest_path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{manifest_path} has {size} bytes, more than a manifest's limit of "
                              f"{MAX_MANIFEST_BYTES}: it is not an edgevlm manifest. Re-export the bundle.")  # fmt: skip
        return json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BundleError(f"{manifest_path} is not readable JSON ({e}); re-export the bundle.") from e
    except RecursionError:
        raise BundleError(f"{manifest_path} is nested too deeply to be an edgevlm manifest; re-export the bundle.") from None  # fmt: skip


def check_output_dir(out_dir: Path, force: bool) -> None:
    """Refuse to export over a non-empty directory unless `force`; called before any model is loaded."""
    if out_dir.exists() and not out_dir.is_dir():
        raise BundleError(f"output {out_dir} exists and is not a directory; choose another -o path.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise BundleError(f"output directory {out_dir} is not empty; pass --force to replace it, or choose another -o.")


class BundleWriter:
    """Writes a bundle atomically: files go into a temporary sibling directory, renamed over `out_dir` on commit.

    Use as a context manager; leaving the block by an exception removes the temporary directory, so nothing
    half-written ever sits at `out_dir`.
    """

    def __init__(self, out_dir: str | os.PathLike, *, force: bool = False):
        self.out_dir = Path(out_dir).absolute()
        self.force = force
        self.tmp_dir: Path | None = None
        self.committed = False

    def __enter__(self) -> BundleWriter:
        check_output_dir(self.out_dir, self.force)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(self.out_dir)
        owner = f"{os.getpid()}-{_process_start(os.getpid()) or 0}"  # who may remove it: see remove_stale_partials
        self.tmp_dir = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.partial-{owner}-", dir=self.out_dir.parent))
        umask = os.umask(0)
        os.umask(umask)
        self.tmp_dir.chmod(0o777 & ~umask)  # mkdtemp makes it private; a bundle is an ordinary folder
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp_dir is not None and self.tmp_dir.exists():
            shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def path(self, name: str) -> Path:
        """Where to write bundle file `name` before commit."""
        if self.tmp_dir is None or self.committed:
            raise RuntimeError("BundleWriter.path() is only valid inside the `with` block, before commit()")
        return self.tmp_dir / name

    def commit(self, manifest: Manifest) -> Path:
        """Checksum every written file, write the manifest, and move the bundle into place."""
        if self.tmp_dir is None or self.committed:
            raise RuntimeError("BundleWriter.commit() is only valid once, inside the `with` block")
        for name in manifest.referenced_files():
            if not (self.tmp_dir / name).is_file():
                raise BundleError(f"export did not produce {name}, which the manifest refers to")
        files = {
            file.name: FileEntry(size=file.stat().st_size, sha256=sha256_file(file))
            for file in sorted(self.tmp_dir.iterdir())
            if file.is_file()
        }
        manifest = dataclasses.replace(manifest, files=files)
        (self.tmp_dir / MANIFEST_NAME).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
        old = None
        with _interruptions_held():  # between the two renames, no bundle is at out_dir
            if self.out_dir.exists():
                check_output_dir(self.out_dir, self.force)  # re-check: the directory may have changed meanwhile
                old = self.out_dir.with_name(f".{self.out_dir.name}.old-{os.getpid()}")
                self.out_dir.rename(old)
            self.tmp_dir.rename(self.out_dir)
            self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("bundle written to %s", self.out_dir)
        return self.out_dir


@contextlib.contextmanager
def _interruptions_held() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive inside the block are raised again after it (on the main thread, where Python
    runs signal handlers; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: held.append(signum))
                for signum in (signal.SIGINT, signal.SIGTERM)}  # fmt: skip
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in held:
            signal.raise_signal(signum)


def remove_stale_partials(out_dir: Path) -> None:
    """Remove the temporary folders of earlier exports to `out_dir` whose process is gone (killed, crashed).

    A writer's folder is `.NAME.partial-PID-START-XXXX`: PID and its start time (clock ticks after boot, 0 where
    unknown) tell a dead owner from a running one, and from an unrelated process that reuses the pid later. A
    folder without them (older edgevlm) is left alone with a warning: its owner cannot be told.
    """
    if os.name != "posix":  # os.kill(pid, 0) probes only on POSIX
        return
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.partial-(?:(\d+)-(\d+)-)?[a-z0-9_]+")
    for folder in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.partial-*"):
        match = pattern.fullmatch(folder.name)
        if match is None or not folder.is_dir() or folder.is_symlink():
            continue
        if match[1] is None:
            logger.warning("%s was left by an export whose process cannot be told; delete it if no export to %s is "
                           "running", folder, out_dir)  # fmt: skip
        elif not _is_running(int(match[1]), int(match[2])):
            logger.info("removing %s, left by an export (pid %s) that is no longer running", folder, match[1])
            shutil.rmtree(folder, ignore_errors=True)


def _process_start(pid: int) -> int | None:
    """When process `pid` started, in clock ticks after boot (Linux), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the command name before ")" may hold spaces
    except (OSError, ValueError, IndexError):
        return None


def _is_running(pid: int, start: int) -> bool:
    """Whether process `pid`, started at `start` (0: unknown), still runs; True where that cannot be told."""
    if pid < 1:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    actual = _process_start(pid)
    return start == 0 or actual is None or actual == start
