"""Pushing a release: offline or without a token it fails with one line, leaves the folder as it was
and never shows the token."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import pytest

from mvmr_hf.cli.release import push_main
from mvmr_hf.errors import ConfigError
from mvmr_hf.models.student import build_student
from mvmr_hf.release.card import CardInfo
from mvmr_hf.release.export import export_student
from mvmr_hf.release.hub import default_commit_message, push_to_hub

SECRET = "hf_ThisIsNotARealTokenButMustNeverBePrinted"


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    student = build_student("test_resnet", projector="8", image_size=32).eval()
    folder = tmp_path_factory.mktemp("run") / "student"
    return export_student(
        student, folder, training_args={"student": "test_resnet"}, card_info=CardInfo(step=12)
    )


def _state(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def _push_fails(argv: list[str], capsys) -> str:
    assert push_main(argv) == 2
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err
    assert captured.err.count("\n") == 1
    return captured.err


def test_offline_push_fails_in_one_line_and_leaves_the_folder(release, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    before = _state(release)
    err = _push_fails([str(release), "me/tiny"], capsys)
    assert "HF_HUB_OFFLINE" in err
    assert f"mvmr-push {release} me/tiny" in err
    assert _state(release) == before


def test_push_without_a_token_says_how_to_log_in(release, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no stored token either
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "stored_tokens"))
    before = _state(release)
    err = _push_fails([str(release), "me/tiny", "--private"], capsys)
    assert "hf auth login" in err
    # Following the hint must not publish what was meant to be private.
    assert f"retry with `mvmr-push {release} me/tiny --private`" in err
    assert _state(release) == before


def test_unreachable_hub_fails_in_one_line_without_the_token(release, capsys, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    before = _state(release)
    with pytest.raises(ConfigError, match="could not push") as error:
        push_to_hub(release, "me/tiny", token=SECRET, revision="step-12")
    assert SECRET not in str(error.value)
    assert f"retry with `mvmr-push {release} me/tiny --revision step-12`" in str(error.value)
    assert _state(release) == before


def test_push_of_a_folder_that_is_not_a_release(tmp_path, capsys):
    err = _push_fails([str(tmp_path / "missing"), "me/tiny"], capsys)
    assert "does not exist" in err
    err = _push_fails([str(tmp_path), "me/tiny"], capsys)
    assert "not a release folder" in err


def test_default_commit_message_names_the_step(release):
    assert default_commit_message(release) == "Upload MV-MR student (step 12)"


def test_a_folder_without_run_facts_is_one_line_before_any_network_call(release, tmp_path, capsys):
    """A fine-tuned classifier's folder has weights and a timm config but no run_info.json."""
    folder = tmp_path / "classifier"
    folder.mkdir()
    for path in release.iterdir():
        if path.name != "run_info.json":
            (folder / path.name).write_bytes(path.read_bytes())
    before = _state(folder)
    err = _push_fails([str(folder), "someone/classifier"], capsys)
    assert "has no run_info.json" in err
    assert "hf upload" in err  # how to publish it instead
    assert _state(folder) == before
