"""Publish a release folder on the Hugging Face Hub.

:func:`push_to_hub` creates the repository if needed (``create_repo(exist_ok=True)``), the
branch when a ``revision`` is given, and uploads the folder in one commit, its card naming the
repository in its loading snippets (:func:`~mvmr_hf.release.export.published_files`). It only reads the
folder. Without a token, in offline mode (``HF_HUB_OFFLINE=1``) or when the Hub cannot be
reached, it raises :class:`~mvmr_hf.errors.ConfigError` with one sentence saying how to retry;
the token never appears in that message.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, get_token, is_offline_mode
from huggingface_hub.errors import HTTPError

from mvmr_hf.errors import ConfigError
from mvmr_hf.release.export import check_release, published_files, read_run_info


def _retry_hint(folder: Path, repo_id: str, private: bool, revision: str | None) -> str:
    """The command that repeats this push: a hint that dropped ``--private`` would publish the model."""
    options = (" --private" if private else "") + (f" --revision {shlex.quote(revision)}" if revision else "")
    return f"then retry with `mvmr-push {shlex.quote(str(folder))} {shlex.quote(repo_id)}{options}`"


def default_commit_message(folder: Path) -> str:
    """ "Upload MV-MR student (step N)", naming the optimizer step of the release when it is known."""
    step = read_run_info(folder).step
    return "Upload MV-MR student" + (f" (step {step})" if step is not None else "")


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
) -> str:
    """Upload the release ``folder`` to the Hub model repository ``repo_id``; return the commit URL.

    The uploaded card and ``run_info.json`` name ``repo_id``, so that the card's ``hf-hub:`` and
    ``from_pretrained`` snippets load this repository; the folder is not modified.

    Args:
        folder: a release folder (``config.json`` and ``model.safetensors``, see
            :mod:`mvmr_hf.release.export`).
        repo_id: ``ORG/NAME`` (created when missing, with ``private`` visibility).
        private: create the repository private (an existing repository keeps its visibility).
        revision: branch to commit to, created from the default branch when missing.
        commit_message: defaults to "Upload MV-MR student (step N)", N from the release's ``run_info.json``.
        token: a Hub token; defaults to the logged-in one (``HF_TOKEN`` or ``hf auth login``).
    """
    folder = check_release(folder)
    # Read (and checked) before any network call: a folder that is not a student release is one line.
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=content)
        for name, content in published_files(folder, repo_id).items()
    ]
    retry = _retry_hint(folder, repo_id, private, revision)
    if is_offline_mode():
        raise ConfigError(f"cannot push: HF_HUB_OFFLINE is set; unset it, {retry}.")
    token = token or get_token()
    if not token:
        raise ConfigError(
            f"cannot push: no Hugging Face token; run `hf auth login` or set HF_TOKEN, {retry}."
        )
    api = HfApi(token=token, library_name="mvmr_hf")
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo.repo_id, branch=revision, exist_ok=True)
        commit = api.create_commit(
            repo_id=repo.repo_id,
            operations=operations,
            revision=revision,
            commit_message=commit_message or default_commit_message(folder),
        )
    except (OSError, HTTPError) as error:
        reason = str(error).splitlines()[0].replace(token, "***") if str(error) else type(error).__name__
        raise ConfigError(
            f"could not push {folder} to {repo_id} ({reason}); check the network and the token's "
            f"write access, {retry}."
        ) from None
    return commit.commit_url
