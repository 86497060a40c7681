"""Finding checkpoint files: in local directories, or on the Hugging Face Hub through its cache.

Only the files a load needs are fetched (one ``hf_hub_download`` per file), so ``HF_HUB_OFFLINE=1``,
the local cache, ``local_files_only``, ``revision`` and ``token`` behave as in every Hub client.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import socket
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath, PureWindowsPath

import huggingface_hub
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

from stable_cascade.checkpoint.errors import CheckpointError, VariantNotFoundError
from stable_cascade.checkpoint.jsonio import read_json_object

logger = logging.getLogger(__name__)
_REPO_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")
#: How long the one connection test to the Hub may take (a network that drops packets).
_PROBE_SECONDS = 5.0


@dataclasses.dataclass(frozen=True)
class HubOptions:
    """How to reach the Hub; ``local_files_only=None`` leaves the decision to ``HF_HUB_OFFLINE``."""

    revision: str | None = None
    cache_dir: str | Path | None = None
    local_files_only: bool | None = None
    token: str | bool | None = None


def resolve_file(
    path_or_repo_id: str | Path, filename: str, subfolder: str | None = None, hub: HubOptions | None = None
) -> Path:
    """The local path of ``filename`` in a directory or Hub repo, downloading it if needed.

    Raises ``FileNotFoundError`` naming what was looked for and where.
    """
    hub = hub or HubOptions()
    root = Path(path_or_repo_id)
    if root.is_dir():
        path = root / subfolder / filename if subfolder else root / filename
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; {_listing(path.parent)}")
        return path
    repo_id = str(path_or_repo_id)
    if not _REPO_ID.match(repo_id):
        raise FileNotFoundError(
            f"{repo_id!r} is neither an existing directory nor a Hub repo id of the form 'owner/name'"
        )
    where = f"{repo_id}/{subfolder}/{filename}" if subfolder else f"{repo_id}/{filename}"
    local_only = bool(hub.local_files_only) or huggingface_hub.constants.HF_HUB_OFFLINE
    unreachable = not local_only and not hub_reachable(huggingface_hub.constants.ENDPOINT)
    try:
        local = huggingface_hub.hf_hub_download(
            repo_id,
            filename,
            subfolder=subfolder or None,
            revision=hub.revision,
            cache_dir=hub.cache_dir,
            local_files_only=bool(hub.local_files_only) or unreachable,
            token=hub.token,
        )
    except LocalEntryNotFoundError as error:  # a subclass of EntryNotFoundError: catch it first
        why = (
            f"the Hub ({huggingface_hub.constants.ENDPOINT}) cannot be reached"
            if unreachable
            else "downloading is disabled or failed (HF_HUB_OFFLINE / local_files_only, or no network)"
        )
        raise FileNotFoundError(
            f"{where} is not in the local Hugging Face cache and {why}; download it once with network "
            "access, or pass a local directory"
        ) from error
    except EntryNotFoundError as error:
        raise FileNotFoundError(f"the Hub repo has no file {where}") from error
    except RepositoryNotFoundError as error:
        raise FileNotFoundError(
            f"no Hub repo {repo_id!r} (or it is private: pass token=...); check the name"
        ) from error
    return Path(local)


@functools.lru_cache(maxsize=8)
def hub_reachable(endpoint: str) -> bool:
    """Whether a connection to the Hub ``endpoint`` (or to the proxy that serves it) opens: one try per
    process and endpoint. Without a network, files then come from the cache alone, and a missing one
    fails at once instead of after ``huggingface_hub``'s five retries (about 30 s, each warned)."""
    url = urllib.parse.urlsplit(endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        via = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = via.hostname or "", via.port or 80
    try:
        socket.create_connection((host, port), timeout=_PROBE_SECONDS).close()
    except OSError as error:
        logger.info("the Hub %s cannot be reached (%s): the local cache alone serves files", endpoint, error)
        return False
    return True


def weights_filenames(stem: str, variant: str | None) -> tuple[str, str]:
    """The single-file and shard-index names diffusers uses for ``stem`` and ``variant``."""
    if variant:
        return f"{stem}.{variant}.safetensors", f"{stem}.safetensors.index.{variant}.json"
    return f"{stem}.safetensors", f"{stem}.safetensors.index.json"


def resolve_weights(
    path_or_repo_id: str | Path,
    stem: str,
    subfolder: str | None = None,
    variant: str | None = None,
    hub: HubOptions | None = None,
) -> list[Path]:
    """The safetensors file(s) holding a model's weights: one file, or every shard of an index."""
    single, index = weights_filenames(stem, variant)
    try:
        return [resolve_file(path_or_repo_id, single, subfolder, hub)]
    except FileNotFoundError as single_error:
        try:
            index_path = resolve_file(path_or_repo_id, index, subfolder, hub)
        except FileNotFoundError:
            raise _missing_weights(path_or_repo_id, stem, subfolder, variant, single_error) from None
    weight_map = read_json_object(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(
            f"{index_path} is not a valid safetensors index (needs a 'weight_map' of tensor name -> file)"
        )
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        check_shard_name(shard, index_path)
    return [resolve_file(path_or_repo_id, shard, subfolder, hub) for shard in shards]


def check_shard_name(shard: str, index_path: Path) -> None:
    """A shard named by an index lies in the index's folder: a relative ``.safetensors`` path without
    ``..`` (``../../outside/x.safetensors`` or an absolute path would read files the model does not own)."""
    posix = PurePosixPath(shard.replace("\\", "/"))
    if (
        posix.is_absolute()
        or PureWindowsPath(shard).drive
        or ".." in posix.parts
        or not shard.endswith(".safetensors")
    ):
        raise CheckpointError(
            f"{index_path}: its weight_map names the shard {shard!r}, which is not a .safetensors file in "
            "the model's folder; shards must be relative file names such as "
            "'diffusion_pytorch_model-00001-of-00002.safetensors'"
        )


def _missing_weights(
    path_or_repo_id: str | Path, stem: str, subfolder: str | None, variant: str | None, cause: Exception
) -> FileNotFoundError:
    folder = Path(path_or_repo_id) / subfolder if subfolder else Path(path_or_repo_id)
    single, index = weights_filenames(stem, variant)
    if not folder.is_dir():
        return (VariantNotFoundError if variant else FileNotFoundError)(
            f"found neither {single} nor {index}: {cause}"
        )
    variants = _variants(folder, stem)
    hint = ""
    if variant and variants:
        hint = f"; available variants: {', '.join(variants)}"
    elif variant:
        hint = "; this folder has no weight variants: leave variant=None"
    elif variants:
        hint = f"; only variants {', '.join(variants)} exist: pass variant='{variants[0]}'"
    if any(folder.glob(f"{stem}*.bin")) or any(folder.glob("*.ckpt")):
        hint += (
            "; the folder holds pickle weights (.bin/.ckpt), which are never loaded: convert them to "
            "safetensors with a tool you trust"
        )
    error = VariantNotFoundError if variant else FileNotFoundError
    return error(f"{folder} has neither {single} nor {index}{hint}")


def _variants(folder: Path, stem: str) -> list[str]:
    """Variant names present in ``folder``: ``stem.V.safetensors``, ``stem.V-00001-of-00002.safetensors``
    or ``stem.safetensors.index.V.json``."""
    pattern = re.compile(
        rf"^{re.escape(stem)}\.(?:safetensors\.index\.(\w+)\.json|(\w+)(?:-\d+-of-\d+)?\.safetensors)$"
    )
    found = {m.group(1) or m.group(2) for p in folder.iterdir() if (m := pattern.match(p.name))}
    return sorted(found - {None})


def _listing(folder: Path) -> str:
    if not folder.is_dir():
        return f"{folder} is not a directory"
    names = sorted(p.name for p in folder.iterdir())
    return f"{folder} holds: {', '.join(names[:20]) or 'nothing'}{' ...' if len(names) > 20 else ''}"
