"""The device install: the wheel alone (`pip install edgevlm-*.whl`, no export extra) in a fresh venv runs a bundle
with `edgevlm run`, and neither torch nor transformers is installed there.

llama-cpp-python compiles llama.cpp when pip has no wheel for it (about 7 minutes on 2 cores): the test takes the one
pip built before from its wheel cache, and is skipped, saying so, when there is none.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import venv
from importlib.metadata import version
from pathlib import Path

import pytest

from edgevlm.demo import demo_bundle
from edgevlm.demo.scenes import scene

ROOT = Path(__file__).resolve().parent.parent
PIP_TIMEOUT_S = 600
OFFLINE = re.compile(r"NewConnectionError|Temporary failure in name resolution|Name or service not known|Network is unreachable|ConnectTimeout")  # fmt: skip


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, check=False, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, (
        f"{' '.join(command)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done


def cached_llama_cpp_wheel() -> Path | None:
    """The llama-cpp-python wheel pip built earlier for the version this venv runs, from pip's wheel cache."""
    wanted = f"llama_cpp_python-{version('llama-cpp-python')}-"
    listing = subprocess.run([sys.executable, "-m", "pip", "cache", "list", "llama_cpp_python", "--format=abspath"],
                             check=False, capture_output=True, text=True)  # fmt: skip
    wheels = [Path(line) for line in listing.stdout.split() if Path(line).name.startswith(wanted)]
    return wheels[0] if wheels else None


def build_wheel(out: Path) -> Path:
    """`pip wheel --no-deps` of a copy of the source (the checkout gets no build/ or egg-info)."""
    source = out / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "edgevlm", source / "edgevlm", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out), str(source)],
        timeout=PIP_TIMEOUT_S)  # fmt: skip
    (wheel,) = out.glob("edgevlm-*.whl")
    return wheel


@pytest.mark.slow  # a fresh venv and the runtime's dependencies: about a minute with pip's caches warm
def test_wheel_alone_runs_a_bundle_without_torch(tmp_path, verified_files_cache):
    llama_wheel = cached_llama_cpp_wheel()
    if llama_wheel is None:
        pytest.skip(f"pip's wheel cache has no llama-cpp-python {version('llama-cpp-python')} wheel: installing would compile llama.cpp (~7 min)")  # fmt: skip
    pytest.importorskip("torch")  # exporting the demo bundle; the fresh venv never gets it
    bundle, _ = demo_bundle("Q4_K_M")
    wheel = build_wheel(tmp_path / "dist")

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python, edgevlm = env_dir / "bin" / "python", env_dir / "bin" / "edgevlm"
    # only the wheel is installed: its own requirements decide what comes. llama-cpp-python is held to the cached
    # wheel's version (a newer release on the index would be an sdist to compile) and that wheel is offered beside
    # the index, so pip takes it and never the sdist
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(f"llama-cpp-python=={version('llama-cpp-python')}\n")
    install = [str(python), "-m", "pip", "install", "--quiet", "--find-links", str(llama_wheel.parent),
               "--constraint", str(constraints), str(wheel)]  # fmt: skip
    done = subprocess.run(install, check=False, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    if done.returncode != 0 and OFFLINE.search(done.stdout + done.stderr):
        pytest.skip(f"the package index is unreachable from here: {OFFLINE.search(done.stdout + done.stderr)[0]}")
    assert done.returncode == 0, f"pip install {wheel.name} exited {done.returncode}:\n{done.stderr[-3000:]}"

    installed = run([str(python), "-m", "pip", "list", "--format=freeze"]).stdout.lower()
    assert "torch" not in installed and "transformers" not in installed, installed
    run([str(python), "-c", "import importlib.util as u; assert u.find_spec('torch') is None and u.find_spec('transformers') is None"])  # fmt: skip

    image = tmp_path / "scene.png"
    demo_scene = scene(0, "test", question_type="shape")
    demo_scene.image.save(image)
    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = run([str(edgevlm), "run", str(bundle), "--image", str(image), "-p", demo_scene.question, "--max-new-tokens", "8"],
               env=clean_env, cwd=tmp_path, timeout=300)  # fmt: skip
    assert demo_scene.answer in done.stdout, (done.stdout, done.stderr)  # greedy: the demo names this circle
    imported = run([str(python), "-c", "import edgevlm; print(edgevlm.__file__)"], env=clean_env, cwd=tmp_path).stdout
    assert str(env_dir) in imported  # the installed wheel ran, not this checkout
