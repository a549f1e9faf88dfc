"""Numbered kernel versions: declared once, picked by environment variable or at run time,
with clear errors for versions that do not exist."""
import pytest

from kernels import versions


@pytest.fixture
def declared(monkeypatch):
    monkeypatch.setattr(versions, "_DECLARED", {})
    return versions.declare("test_kernel", {1: "the old one", 2: "the rewrite"}, default=2)


def test_default_and_run_time_selection(declared):
    assert declared.current() == 2
    versions.select("test_kernel", 1)
    assert declared.current() == 1
    assert versions.table() == [{"name": "test_kernel", "versions": {1: "the old one",
                                                                     2: "the rewrite"},
                                 "default": 2, "selected": 1,
                                 "variable": "GPTK_TEST_KERNEL_VERSION"}]


def test_environment_variable_picks_a_version(monkeypatch):
    monkeypatch.setattr(versions, "_DECLARED", {})
    monkeypatch.setenv("GPTK_TEST_KERNEL_VERSION", "1")
    assert versions.declare("test_kernel", {1: "old", 2: "new"}, default=2).current() == 1


def test_bad_versions_are_clear_errors(declared, monkeypatch):
    with pytest.raises(ValueError, match="test_kernel has versions 1: the old one; 2: the rewrite"):
        versions.select("test_kernel", 3)
    with pytest.raises(KeyError, match="no kernel versions named 'other'"):
        versions.select("other", 1)
    with pytest.raises(ValueError, match="declared twice"):
        versions.declare("test_kernel", {1: "x"}, default=1)
    monkeypatch.setenv("GPTK_ENV_KERNEL_VERSION", "seven")
    with pytest.raises(ValueError, match="GPTK_ENV_KERNEL_VERSION='seven'"):
        versions.declare("env_kernel", {1: "only"}, default=1)
    with pytest.raises(ValueError, match="default version 3"):
        versions.declare("bad_default", {1: "only"}, default=3)
