"""Every discovered exporter family has a tiny model builder and a parity suite: adding a family without them fails
here."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from edgevlm.exporters import aliases, architectures, families, family_for, verify
from edgevlm.exporters.family import Family


@pytest.mark.parametrize("name", sorted(families()))
def test_family_has_a_tiny_builder_and_a_parity_suite(name):
    family = families()[name]
    # a Family subclass: a family lacking a protocol method (its tiny builder included) is refused when made
    assert Family in type(family).__mro__, f"{name}'s FAMILY does not subclass edgevlm.exporters.family.Family"
    assert family.architectures and all(family_for(a) is family for a in family.architectures)
    assert (Path(__file__).parent / f"test_{name}.py").is_file(), f"{name} has no parity suite (tests/test_{name}.py)"
    suite = importlib.import_module(f"test_{name}")
    assert suite.FAMILY is family, f"test_{name}.py does not test edgevlm.exporters.{name}'s FAMILY"
    assert suite.compare_case is verify.compare_case, f"test_{name}.py does not compare bundles with verify.compare_case"
    f32_test = getattr(suite, "test_f32_bundle_matches_transformers", None)
    assert callable(f32_test), f"test_{name}.py lacks test_f32_bundle_matches_transformers"
    cases = [mark.args[1] for mark in getattr(f32_test, "pytestmark", []) if mark.name == "parametrize"]
    assert verify.PARITY_CASES in cases, f"test_{name}.py's F32 test does not run over verify.PARITY_CASES"


def test_unsupported_architecture_names_the_supported_ones():
    from edgevlm.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError) as info:
        family_for("GPT2LMHeadModel")
    for name in [*architectures(), *aliases()]:
        assert name in str(info.value)


def test_export_help_lists_every_family_and_alias(capsys):
    from edgevlm.cli import main

    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name in [*architectures(), *aliases(), *aliases().values()]:
        assert name in text
