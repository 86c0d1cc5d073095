"""The settings registry (olmocr/envs.py) is the one home of every OLMOCR_* variable: the settings classes
take their names and defaults from it, the code names no variable it does not declare, and the docs tables
are generated from it (a stale table fails here: run ``python -m olmocr.envs --write-docs``)."""

from __future__ import annotations

import dataclasses
import re
import subprocess

import pytest

from olmocr import envs
from olmocr.server.errors import SettingsError
from olmocr.server.settings import ENV_NAMES, ServerSettings
from olmocr.server.status_service import ServiceSettings
from tests.standin_helpers import REPO_ROOT

NAME = re.compile(r"\bOLMOCR_[A-Z0-9_]*[A-Z0-9]\b")
#: Upper-case names that are not environment variables (a constant, a placeholder mark).
NOT_VARIABLES = {"OLMOCR_COMPAT_VERSION", "OLMOCR_IMAGE"}


def _tracked(*patterns: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_every_variable_the_code_and_deployment_files_name_is_declared():
    undeclared: dict[str, set[str]] = {}
    for rel in _tracked("olmocr", "scripts", "deploy", "supervisord.conf", "bench"):
        if rel.endswith((".pdf", ".png")):
            continue
        text = (REPO_ROOT / rel).read_text(encoding="utf-8", errors="replace")
        for name in NAME.findall(text):
            if name in envs.BY_NAME or name in envs.TEST_ONLY or name in NOT_VARIABLES:
                continue
            if any(name.startswith(prefix) for prefix in envs.PREFIX_FAMILIES):
                continue
            undeclared.setdefault(name, set()).add(rel)
    assert not undeclared, f"declare these in olmocr/envs.py: {undeclared}"


@pytest.mark.parametrize("rel", sorted(envs.DOC_TABLES))
def test_docs_settings_tables_are_generated_from_the_registry(rel):
    text = (REPO_ROOT / rel).read_text(encoding="utf-8")
    for component in envs.DOC_TABLES[rel]:
        assert envs.render_doc(text, component) == text, (
            f"{rel}: the {component} settings table is stale; run python -m olmocr.envs --write-docs")


def test_every_declared_variable_is_in_a_docs_table():
    tabled = {c for components in envs.DOC_TABLES.values() for c in components}
    assert {s.component for s in envs.REGISTRY} <= tabled


@pytest.mark.parametrize("cls, component", [(ServerSettings, envs.SERVER), (ServiceSettings, envs.STATUS)])
def test_settings_classes_take_names_and_defaults_from_the_registry(cls, component):
    by_field = envs.field_names(component)
    for f in dataclasses.fields(cls):
        if f.name == "token":  # read by read_token from two variables, never stored in the registry default
            continue
        assert f.name in by_field, f"{cls.__name__}.{f.name} has no OLMOCR_* variable in olmocr/envs.py"
        assert f.default == envs.default(by_field[f.name]), f"{cls.__name__}.{f.name} default differs"
    assert set(by_field) <= {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("name, raw, expected", [
    ("OLMOCR_PORT", "8000", 8000),
    ("OLMOCR_HEALTH_INTERVAL", "2.5", 2.5),
    ("OLMOCR_VLLM_ARGS", "--max-num-seqs 8 --foo 'a b'", ("--max-num-seqs", "8", "--foo", "a b")),
    ("OLMOCR_MODEL", "/models/x", "/models/x"),
])
def test_values_are_parsed_by_type(name, raw, expected):
    assert envs.value(name, {name: raw}) == expected
    assert envs.value(name, {}) == envs.default(name)
    assert envs.value(name, {name: ""}) == envs.default(name)


@pytest.mark.parametrize("name, raw, message", [
    ("OLMOCR_PORT", "x", "OLMOCR_PORT='x' is not an integer; fix or unset it"),
    ("OLMOCR_HEALTH_TIMEOUT", "soon", "OLMOCR_HEALTH_TIMEOUT='soon' is not a number; fix or unset it"),
])
def test_a_bad_value_is_one_line_naming_the_variable(name, raw, message):
    with pytest.raises(SettingsError) as err:
        ServerSettings.from_env({name: raw})
    assert str(err.value) == message


def test_server_settings_round_trip_through_the_environment():
    settings = ServerSettings(port=31000, extra_vllm_args=("--a", "b c"), health_interval=2.0)
    assert ServerSettings.from_env(settings.to_env()) == settings
    assert set(settings.to_env()) <= set(ENV_NAMES.values())
