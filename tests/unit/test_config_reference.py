"""The configuration reference is generated from the schema: every key described, docs/configuration.md
in step with it, and an unknown key answered with the key it most likely meant."""
from __future__ import annotations

import pathlib

import pytest

from helpers import ROOT
from patchcore_dist.config import COMMAND_KEYS, commands_using, inapplicable, load_config, schema_keys
from patchcore_dist.config_reference import REGENERATE, first_clause, render_markdown
from patchcore_dist.errors import ConfigError

DOC = pathlib.Path(ROOT) / "docs" / "configuration.md"


def test_docs_configuration_md_is_generated_from_the_schema():
    assert DOC.read_text() == render_markdown(), f"docs/configuration.md is stale: regenerate it with  {REGENERATE}"


def test_every_key_is_described_and_listed_with_its_default_and_commands():
    doc = render_markdown()
    for key, field in schema_keys().items():
        assert field.description, f"{key} has no description"
        row = next(line for line in doc.splitlines() if line.startswith(f"| `{key}` |"))
        assert field.description.split(" ")[0] in row and commands_using(key)[0] in row
    assert "| `coreset.ratio` | number (> 0.0, <= 1.0) | `0.1` | fit, demo |" in doc
    assert "| `backbone.layers` | list of strings or null | `[blocks.2, blocks.4]` (packaged config" in doc


def test_every_command_uses_known_keys_only():
    keys = schema_keys()
    for command, entries in COMMAND_KEYS.items():
        for e in entries:
            assert any(k == e or k.startswith(e + ".") for k in keys), f"{command}: {e} is not in the schema"


@pytest.mark.parametrize("command, key, note", [
    ("score", "coreset.ratio", "coreset.ratio is a fit setting; score uses the model's (ignored here)"),
    ("evaluate", "index.type", "index.type is a fit setting; evaluate uses the model's (ignored here)"),
    ("fit", "output.heatmaps", "output.heatmaps is a score setting; fit does not use it (ignored here)"),
    ("runs", "runtime.device", "runtime.device is a fit setting; runs does not use it (ignored here)"),
    ("score", "index.nprobe", None), ("score", "backbone.name", None),  # used; checked against the model
    ("runs", "storage.endpoint_url", None), ("demo", "output.heatmaps", None), ("fit", "no.such", None),
])
def test_keys_a_command_does_not_use(command, key, note):
    assert inapplicable(command, key) == note


def test_first_clause_keeps_help_lines_short():
    assert first_clause("fraction kept (0 < ratio <= 1); more") == "fraction kept (0 < ratio <= 1)"
    long = "registry name (" + "x, " * 30 + "y) or any CNN; more"
    assert first_clause(long) == "registry name or any CNN"
    assert len(first_clause("word " * 40)) <= 64


@pytest.mark.parametrize("override, guess", [
    ("coreset.ratoi=0.1", "coreset.ratio"), ("runtime.batchsize=4", "runtime.batch_size"),
    ("runtime.heatmaps=false", "output.heatmaps"), ("sed=3", "seed"),
])
def test_an_unknown_key_names_the_key_it_most_likely_meant(override, guess):
    with pytest.raises(ConfigError, match=f"{override.split('=')[0]}: unknown key; did you mean {guess}\\?"):
        load_config(None, [override])


def test_a_typo_in_a_yaml_file_too(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("coreset:\n  ratoi: 0.1\n")
    with pytest.raises(ConfigError, match=r"coreset.ratoi: unknown key; did you mean coreset.ratio\?"):
        load_config(p)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["nosuchsection.x=1"])
    assert "nosuchsection: unknown key" in str(e.value) and "did you mean" not in str(e.value)
