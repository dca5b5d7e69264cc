"""Every exportable family has a tiny fixture and a parity suite: adding a family without them fails here."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgevlm.exporters import FAMILY_MODULES, family_for


@pytest.mark.parametrize("architecture", sorted(FAMILY_MODULES))
def test_family_has_a_tiny_fixture_and_a_parity_suite(architecture):
    family = family_for(architecture)
    assert family.architecture == architecture
    assert callable(getattr(family, "build_tiny", None)), f"{architecture} has no tiny model builder (build_tiny)"
    parity = Path(__file__).parent / f"test_{family.name}.py"
    assert parity.is_file(), f"{architecture} has no parity suite ({parity.name})"
    source = parity.read_text()
    for check in ("def test_f32_bundle_matches_transformers", "compare_case(", "PARITY_CASES"):
        assert check in source, f"{parity.name} lacks {check!r}: bundles must be checked against transformers"


def test_unsupported_architecture_names_the_supported_ones():
    from edgevlm.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError) as info:
        family_for("GPT2LMHeadModel")
    for architecture in FAMILY_MODULES:
        assert architecture in str(info.value)


def test_export_help_lists_every_family_and_alias(capsys):
    from edgevlm.cli import main
    from edgevlm.exporters import ALIASES

    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name in [*FAMILY_MODULES, *ALIASES, *ALIASES.values()]:
        assert name in text
