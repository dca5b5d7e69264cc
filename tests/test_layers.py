"""The layers hold at run time: planning and `edgevlm --help` load neither llama.cpp nor onnxruntime, and exporter
families never import each other. The static contracts are in pyproject.toml ([tool.importlinter], `make test`)."""

from __future__ import annotations

import itertools
import json
import pkgutil
import subprocess
import sys

import grimp
import pytest

import edgevlm.exporters

BACKENDS = ("llama_cpp", "onnxruntime", "torch")


def backends_loaded_by(code: str) -> list[str]:
    """The backends in sys.modules after running `code` in a fresh interpreter."""
    probe = f"{code}\nimport json, sys; print(json.dumps([m for m in {BACKENDS!r} if m in sys.modules]))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def test_profiles_and_planning_load_no_backend():
    assert backends_loaded_by("import edgevlm.profiles, edgevlm.budget, edgevlm.bundle") == []


def test_cli_help_loads_no_backend():
    code = "import contextlib, io, edgevlm.cli\nwith contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n    edgevlm.cli.main(['--help'])"  # fmt: skip
    assert backends_loaded_by(code) == []


def test_llama_cpp_is_initialised_on_first_need_not_at_import():
    code = "import edgevlm.runtimes.llm, edgevlm.llama_backend as llama\nprint(llama._initialized)\nllama.supports_gpu_offload()\nprint(llama._initialized)"  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.split() == ["False", "True"]


def exporter_families() -> list[str]:
    """The family folders (subpackages) of edgevlm.exporters, as discovery finds them."""
    return sorted(m.name for m in pkgutil.iter_modules(edgevlm.exporters.__path__, "edgevlm.exporters.") if m.ispkg)


def test_exporter_families_never_import_each_other():
    """An import-linter independence contract cannot say "every subpackage": `edgevlm.exporters.*` also matches the
    shared modules every family imports. So the families are discovered here and checked pairwise, even through a
    shared module."""
    families = exporter_families()
    if len(families) < 2:
        pytest.skip(f"fewer than two family folders under edgevlm/exporters ({families}): nothing to keep apart")
    graph = grimp.build_graph("edgevlm", cache_dir=None)
    chains = [
        " -> ".join(chain)
        for importer, imported in itertools.permutations(families, 2)
        for chain in graph.find_shortest_chains(importer=importer, imported=imported, as_packages=True)
    ]
    assert not chains, "exporter families import each other (share the code through a shared module):\n" + "\n".join(chains)  # fmt: skip
