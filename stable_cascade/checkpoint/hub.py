"""``push_to_hub``: save into a temporary folder and upload it with ``huggingface_hub``, as diffusers does."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import huggingface_hub

logger = logging.getLogger(__name__)


def check_safe_serialization(safe_serialization: bool) -> None:
    """Only safetensors is written: pickle files can run code when loaded."""
    if not safe_serialization:
        raise ValueError(
            "safe_serialization=False would write pickle (.bin) files, which can run arbitrary code when "
            "loaded; this package writes safetensors only: leave safe_serialization=True"
        )


def upload_folder(
    folder: Path,
    repo_id: str,
    *,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    create_pr: bool = False,
) -> Any:
    """Create ``repo_id`` if needed and upload ``folder`` in one commit; ``huggingface_hub``'s commit info."""
    api = huggingface_hub.HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    logger.info("uploading %s to the Hub repo %s", folder, repo.repo_id)
    return api.upload_folder(
        repo_id=repo.repo_id,
        folder_path=str(folder),
        commit_message=commit_message or "Upload with stable_cascade",
        create_pr=create_pr,
    )


def save_and_upload(save: Callable[[Path], None], repo_id: str, **options: Any) -> Any:
    """``save`` into a temporary folder and :func:`upload_folder` it (``options``: its keywords)."""
    with tempfile.TemporaryDirectory() as folder:
        save(Path(folder))
        return upload_folder(Path(folder), repo_id, **options)
