"""The bundle: one folder with a manifest (`edgevlm.json`), a vision ONNX graph and a GGUF language model.

The manifest is the contract between the exporter and the runtime: everything the runtime needs to know about a
model family is data here. Bundles are written into a temporary sibling directory and renamed into place at the
end, so a folder that carries a manifest is always complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import math
import os
import re
import shutil
import signal
import tempfile
import threading
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .budget import DEFAULT_MAX_IMAGE_TOKENS, BudgetLimits
from .errors import BudgetError, BundleError
from .images import preprocessing_from_dict
from .integrity import FileStamp, VerifiedFiles, sha256_file

logger = logging.getLogger(__name__)

MANIFEST_NAME = "edgevlm.json"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 1 << 20  # a manifest is a few KB (the tokenizer and chat template live in the GGUF)
VISION_DTYPES = ("fp32", "fp16", "int8")
POSITION_KINDS = ("mrope", "linear")  # edgevlm.runtimes.positions
PATCH_POSITION_KINDS = ("qwen2_vl", "none")  # edgevlm.runtimes.vision.GRAPH_INPUTS
TEXT_NORMALIZATIONS = (None, "NFC", "NFD", "NFKC", "NFKD")  # unicodedata.normalize's forms
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass(frozen=True)
class VisionVariant:
    """One precision of the vision graph, with how it was validated."""

    file: str
    dtype: str  # fp32 | fp16 | int8
    validation: dict = field(default_factory=dict)


@dataclass(frozen=True)
class VisionSpec:
    variants: dict[str, VisionVariant]
    default: str
    embedding_dim: int
    input_names: tuple[str, ...] = ("pixel_patches", "patch_positions")
    output_name: str = "image_embeds"
    patch_positions: str = "qwen2_vl"  # how the runtime computes the graph's patch position input
    # The tower's sizes, for memory/time estimates (`edgevlm plan`); None in bundles exported before they were kept.
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None


@dataclass(frozen=True)
class LLMSpec:
    file: str
    quantization: str  # F32 | F16 | Q8_0 | Q4_K_M
    arch: str
    n_ctx_train: int
    embedding_length: int
    text_normalization: str | None = None  # Unicode form the tokenizer expects ("NFC" for Qwen2); llama.cpp applies none


@dataclass(frozen=True)
class TokenSpec:
    """Special tokens, as text (for the chat template) and ids (for checks)."""

    image_pad: str
    image_pad_id: int
    vision_start_id: int | None
    vision_end_id: int | None
    eos_ids: tuple[int, ...]


@dataclass(frozen=True)
class PositionSpec:
    """How the LLM positions image embeddings: `mrope` (Qwen2-VL's 3-D positions) or `linear`."""

    kind: str
    merge_size: int = 1
    sections: tuple[int, ...] = ()


@dataclass(frozen=True)
class Manifest:
    family: str
    source: dict
    preprocessing: dict
    vision: VisionSpec
    llm: LLMSpec
    tokens: TokenSpec
    positions: PositionSpec
    files: dict[str, FileEntry] = field(default_factory=dict)
    validation: dict = field(default_factory=dict)
    # Bundle-level token limits, the lowest-precedence layer (see `budget.resolve_limits`). Manifests written
    # before this section existed get the same default as new exports.
    budget: BudgetLimits = field(default_factory=lambda: _default_budget())  # defined below the class
    edgevlm_version: str = ""
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: object, where: str = MANIFEST_NAME) -> Manifest:
        """Read and check a manifest (parsed JSON); anything malformed is a BundleError naming the key."""
        if not isinstance(data, dict):
            raise BundleError(f"{where} is malformed: expected a JSON object, got {_describe(data)}; re-export the bundle.")  # fmt: skip
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"{where} has format version {_describe(version)}; this edgevlm reads version {FORMAT_VERSION}. "
                "Re-export the bundle with this edgevlm, or install the edgevlm version that wrote it."
            )
        try:
            manifest = _read_dataclass(cls, data, "")
            _check_manifest(manifest)
        except _Malformed as e:
            raise BundleError(f"{where} is malformed: {e}; fix it or re-export the bundle.") from None
        except BudgetError as e:
            raise BundleError(f"{where} has an invalid budget section ({e}); fix it or re-export the bundle.") from e
        return manifest

    def referenced_files(self) -> list[str]:
        """The files the runtime opens by name: the LLM and every vision graph."""
        return [self.llm.file] + [variant.file for variant in self.vision.variants.values()]


class _Malformed(Exception):
    """A manifest value of the wrong type or out of range; the message names its key."""


def _describe(value: object) -> str:
    """`value` as JSON-ish text, cut short: error messages quote what they refuse."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _read_dataclass(cls: type, data: object, key: str):
    """An instance of dataclass `cls` from a JSON object, every field's type checked against its annotation."""
    if not isinstance(data, dict):
        raise _Malformed(f"{key or 'the manifest'}: expected a JSON object, got {_describe(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise _Malformed(f"{key or 'the manifest'}: unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(fields)}")  # fmt: skip
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = _read_value(hints[name], data[name], f"{key}.{name}" if key else name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _Malformed(f"{key or 'the manifest'}: missing key {name!r}")
    return cls(**values)


def _read_value(annotation, value: object, key: str):
    """`value` checked against a field annotation: str, int, float, bool, dict, X | None, tuple[X, ...],
    dict[str, X] or a dataclass."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (annotation,) = [arg for arg in args if arg is not type(None)]
        return _read_value(annotation, value, key)
    if dataclasses.is_dataclass(annotation):
        return _read_dataclass(annotation, value, key)
    if origin is tuple and isinstance(value, list):
        return tuple(_read_value(args[0], item, f"{key}[{i}]") for i, item in enumerate(value))
    if origin is dict and isinstance(value, dict):
        return {name: _read_value(args[1], item, f"{key}.{name}") for name, item in value.items()}
    if annotation is float and isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return value
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation in (str, bool, dict) and isinstance(value, annotation):
        return value
    expected = {str: "a string", int: "an integer", float: "a finite number", bool: "true or false"}.get(annotation)
    raise _Malformed(f"{key}: expected {expected or ('a JSON array' if origin is tuple else 'a JSON object')}, got {_describe(value)}")  # fmt: skip


def _check_file_name(name: object, key: str) -> None:
    """A bundle file name must be a plain name inside the bundle folder: no directories, no way out of it."""
    plain = (
        isinstance(name, str) and 0 < len(name) <= 255 and not name.startswith(".")
        and not any(c in name for c in "/\\\0")
    )  # fmt: skip
    if not plain:
        raise _Malformed(f"{key}: {_describe(name)} is not a plain file name inside the bundle (no '/', '\\', "
                         "'..', leading '.', NUL or empty names)")  # fmt: skip


def _check_manifest(manifest: Manifest) -> None:
    """The checks beyond types: file names, kinds this edgevlm knows, positive sizes, files listed with checksums."""
    vision, llm, positions = manifest.vision, manifest.llm, manifest.positions
    _check_file_name(llm.file, "llm.file")
    if not vision.variants:
        raise _Malformed("vision.variants: lists no vision graph")
    for dtype, variant in vision.variants.items():
        _check_file_name(variant.file, f"vision.variants.{dtype}.file")
        if variant.dtype not in VISION_DTYPES:
            raise _Malformed(f"vision.variants.{dtype}.dtype: {variant.dtype!r} is not one of {', '.join(VISION_DTYPES)}")  # fmt: skip
    if vision.default not in vision.variants:
        raise _Malformed(f"vision.default: {vision.default!r} is not one of the variants ({', '.join(vision.variants)})")  # fmt: skip
    if vision.patch_positions not in PATCH_POSITION_KINDS:
        raise _Malformed(f"vision.patch_positions: {vision.patch_positions!r} is not known to this edgevlm (it knows {', '.join(PATCH_POSITION_KINDS)})")  # fmt: skip
    if positions.kind not in POSITION_KINDS:
        raise _Malformed(f"positions.kind: {positions.kind!r} is not known to this edgevlm (it knows {', '.join(POSITION_KINDS)})")  # fmt: skip
    if llm.text_normalization not in TEXT_NORMALIZATIONS:
        raise _Malformed(f"llm.text_normalization: {llm.text_normalization!r} is not a Unicode normalization form "
                         f"(one of {', '.join(map(str, TEXT_NORMALIZATIONS))})")  # fmt: skip
    if not manifest.tokens.image_pad:
        raise _Malformed("tokens.image_pad: the image placeholder's text is empty")
    for key, value in [("positions.merge_size", positions.merge_size), ("vision.embedding_dim", vision.embedding_dim),
                       ("llm.n_ctx_train", llm.n_ctx_train), ("llm.embedding_length", llm.embedding_length)]:  # fmt: skip
        if value < 1:
            raise _Malformed(f"{key}: expected a positive integer, got {value}")
    try:
        preprocessing_from_dict(manifest.preprocessing)
    except (ValueError, TypeError) as e:
        raise _Malformed(f"preprocessing: {e}") from None
    _check_files_section(manifest)


def _check_files_section(manifest: Manifest) -> None:
    if not manifest.files:
        raise _Malformed("files: lists no files, so nothing could be checked")
    for name, entry in manifest.files.items():
        _check_file_name(name, f"files.{name}")
        if entry.size < 0 or not _SHA256.fullmatch(entry.sha256):
            raise _Malformed(f"files.{name}: expected a size >= 0 and a sha256 of 64 lowercase hex digits")
    unlisted = [name for name in manifest.referenced_files() if name not in manifest.files]
    if unlisted:
        raise _Malformed(f"files: does not list {', '.join(unlisted)}, which the manifest refers to")


def _default_budget() -> BudgetLimits:
    return BudgetLimits(max_image_tokens=DEFAULT_MAX_IMAGE_TOKENS)


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
