"""Cost of checking a bundle's sha256 when it is first loaded on a device, and of a later (cached) load.

    python benchmarks/bench_bundle_verify.py TINY_BUNDLE /tmp/proxy-2b

No real 2B bundle is needed: files of the 2B bundle's sizes (llm-Q4_K_M.gguf 989 MB, vision-int8.onnx 675 MB,
vision.onnx + vision.onnx.data 2.66 GB) are written with random bytes into the second directory (a proxy: hashing
does not care what the bytes are), with TINY_BUNDLE's manifest edited to list them. Prints the raw sha256
throughput, then three times: `Bundle.verify(cached=True)` (what `edgevlm.load` does) with an empty record of
verified files, and again with the record. The page cache is warm (the files were just written or read); on a device
the first load also reads every file from storage once.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from edgevlm.bundle import MANIFEST_NAME, Bundle
from edgevlm.integrity import CACHE_DIR_ENV, sha256_file

SIZES = {"llm-Q4_K_M.gguf": 989_000_000, "vision-int8.onnx": 675_000_000, "vision.onnx": 1_500_000,
         "vision.onnx.data": 2_660_000_000}  # fmt: skip


def write_random(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size == size:
        return
    with open(path, "wb") as f:
        f.writelines(os.urandom(min(64 << 20, size - offset)) for offset in range(0, size, 64 << 20))


def proxy_bundle(tiny: Path, root: Path) -> int:
    root.mkdir(parents=True, exist_ok=True)
    for name, size in SIZES.items():
        write_random(root / name, size)
    manifest = json.loads((tiny / MANIFEST_NAME).read_text())
    manifest["llm"]["file"] = "llm-Q4_K_M.gguf"
    manifest["vision"]["variants"] = {
        "fp32": {**manifest["vision"]["variants"]["fp32"], "file": "vision.onnx"},
        "int8": {"file": "vision-int8.onnx", "dtype": "int8", "validation": {}},
    }
    manifest["files"] = {name: {"size": size, "sha256": sha256_file(root / name)} for name, size in SIZES.items()}
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))
    return sum(SIZES.values())


def main(tiny: str, root: str) -> None:
    total = proxy_bundle(Path(tiny), Path(root))
    gguf = Path(root) / "llm-Q4_K_M.gguf"
    start = time.perf_counter()
    sha256_file(gguf)
    print(f"sha256 of a file in the page cache: {gguf.stat().st_size / 1e6 / (time.perf_counter() - start):.0f} MB/s")
    os.environ[CACHE_DIR_ENV] = cache = tempfile.mkdtemp(prefix="edgevlm-bench-cache-")
    for run in range(3):
        shutil.rmtree(cache, ignore_errors=True)
        start = time.perf_counter()
        Bundle.open(root).verify(cached=True)
        first = time.perf_counter() - start
        start = time.perf_counter()
        results = Bundle.open(root).verify(cached=True)
        cached = time.perf_counter() - start
        assert set(results.values()) == {"ok (verified before)"}, results
        print(f"run {run}: first load {first:.2f} s ({total / 1e6 / first:.0f} MB/s over {total / 1e9:.2f} GB), "
              f"cached load {cached * 1000:.1f} ms")  # fmt: skip
    shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
