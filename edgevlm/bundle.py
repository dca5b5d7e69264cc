"""The bundle: one folder with a manifest (`edgevlm.json`), a vision ONNX graph and a GGUF language model.

The manifest is the contract between the exporter and the runtime: everything the runtime needs to know about a
model family is data here. Bundles are written into a temporary sibling directory and renamed into place at the
end, so a folder that carries a manifest is always complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .budget import DEFAULT_MAX_IMAGE_TOKENS, BudgetLimits
from .errors import BudgetError, BundleError

logger = logging.getLogger(__name__)

MANIFEST_NAME = "edgevlm.json"
FORMAT_VERSION = 1


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
    def from_dict(cls, data: dict, where: str = MANIFEST_NAME) -> Manifest:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"{where} has format version {version!r}; this edgevlm reads version {FORMAT_VERSION}. "
                "Re-export the bundle with this edgevlm, or install the edgevlm version that wrote it."
            )
        try:
            vision = dict(data["vision"])
            vision["variants"] = {k: VisionVariant(**v) for k, v in vision["variants"].items()}
            vision["input_names"] = tuple(vision.get("input_names", VisionSpec.input_names))
            tokens = dict(data["tokens"])
            tokens["eos_ids"] = tuple(tokens["eos_ids"])
            positions = dict(data["positions"])
            positions["sections"] = tuple(positions.get("sections", ()))
            return cls(
                family=data["family"],
                source=data["source"],
                preprocessing=data["preprocessing"],
                vision=VisionSpec(**vision),
                llm=LLMSpec(**data["llm"]),
                tokens=TokenSpec(**tokens),
                positions=PositionSpec(**positions),
                files={name: FileEntry(**entry) for name, entry in data["files"].items()},
                validation=data.get("validation", {}),
                budget=BudgetLimits.from_dict(data["budget"], f"{where}: budget") if "budget" in data else _default_budget(),
                edgevlm_version=data.get("edgevlm_version", ""),
                format_version=version,
            )
        except BudgetError as e:
            raise BundleError(f"{where} has an invalid budget section ({e}); fix it or re-export the bundle.") from e
        except (KeyError, TypeError) as e:
            raise BundleError(f"{where} is malformed ({type(e).__name__}: {e}); re-export the bundle.") from e


def _default_budget() -> BudgetLimits:
    return BudgetLimits(max_image_tokens=DEFAULT_MAX_IMAGE_TOKENS)


def sha256_file(path: Path, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """An exported bundle on disk. `Bundle.open` checks that every listed file is present with its recorded size."""

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
        try:
            data = json.loads(manifest_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"{manifest_path} is not readable JSON ({e}); re-export the bundle.") from e
        manifest = Manifest.from_dict(data, where=str(manifest_path))
        bundle = cls(path, manifest)
        bundle.check_sizes()
        return bundle

    def file(self, name: str) -> Path:
        return self.path / name

    def check_sizes(self) -> None:
        """Fast completeness check: every file exists with the size the manifest records."""
        for name, entry in self.manifest.files.items():
            file = self.path / name
            if not file.is_file():
                raise BundleError(f"bundle {self.path} is missing {name}; copy the whole bundle folder again.")
            size = file.stat().st_size
            if size != entry.size:
                raise BundleError(
                    f"bundle file {file} has {size} bytes, the manifest expects {entry.size}: it is truncated or "
                    "was changed. Copy the whole bundle folder again."
                )

    def verify(self) -> dict[str, str]:
        """Full check: sizes and sha256 of every file. Returns {file: "ok"} or raises BundleError."""
        self.check_sizes()
        for name, entry in self.manifest.files.items():
            if sha256_file(self.path / name) != entry.sha256:
                raise BundleError(f"bundle file {self.path / name} fails its sha256 check: it is corrupt. "
                                  "Copy the whole bundle folder again.")  # fmt: skip
        return {name: "ok" for name in self.manifest.files}


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
        self.tmp_dir = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.partial-", dir=self.out_dir.parent))
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
        for name in _referenced_files(manifest):
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


def _referenced_files(manifest: Manifest) -> list[str]:
    return [manifest.llm.file] + [variant.file for variant in manifest.vision.variants.values()]
