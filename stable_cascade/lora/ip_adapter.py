"""IP-Adapter files: safetensors with the two key groups IP-Adapter files use, ``image_proj.*`` (the image
projection or resampler) and ``ip_adapter.<k>.to_k_ip`` / ``to_v_ip`` (attention block ``k``'s key and
value projections), and the configuration as JSON in the metadata (``format: stable-cascade-ip-adapter``,
``config``). A file without our metadata is read when its shapes tell the configuration (a linear image
projection; a resampler's head count is not in its shapes).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from stable_cascade.checkpoint import CheckpointError, read_state_dict, save_tensors_file
from stable_cascade.nn.ip_adapter import IPAdapter
from stable_cascade.specs.ip_adapter import IPAdapterConfig

FORMAT_TAG = "stable-cascade-ip-adapter"
GROUPS = ("image_proj", "ip_adapter")
_BLOCK_KEY = re.compile(r"ip_adapter\.(\d+)\.to_k_ip\.weight")


def save_ip_adapter(path: str | Path, adapter: IPAdapter, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``adapter`` to ``path`` (atomically); ``metadata`` (str → str) is stored with its config."""
    extra = dict(metadata or {})
    if any(not isinstance(k, str) or not isinstance(v, str) for k, v in extra.items()):
        raise TypeError(f"safetensors metadata maps strings to strings; got {extra}")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter.state_dict().items()}
    header = {**extra, "format": FORMAT_TAG, "config": json.dumps(adapter.config.to_dict())}
    save_tensors_file(tensors, path, metadata=header)
    return Path(path)


def load_ip_adapter(path: str | Path) -> IPAdapter:
    """The IP-Adapter in file ``path``; a one-line ``ValueError`` for a file that is not one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"IP-Adapter file {path} does not exist; pass an existing .safetensors file")
    try:
        tensors = read_state_dict([path])
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
    except CheckpointError as error:
        raise ValueError(str(error)) from None
    return ip_adapter_from_tensors(tensors, metadata, str(path))


def ip_adapter_from_tensors(
    tensors: Mapping[str, Tensor], metadata: Mapping[str, str], source: str
) -> IPAdapter:
    """An adapter from its tensors and metadata (see the module's docstring); errors name ``source``."""
    groups = {key.split(".")[0] for key in tensors}
    if not tensors or not groups <= set(GROUPS) or len(groups) < 2:
        raise ValueError(
            f"{source} is not an IP-Adapter file: expected the key groups image_proj.* and ip_adapter.*, "
            f"got {', '.join(sorted(groups)) or 'no tensors'}"
        )
    config = _config(tensors, metadata, source)
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{source}: tensor {key} is {tensor.dtype}, not floating point")
    with torch.device("meta"):
        adapter = IPAdapter(config)
    expected = adapter.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected else ""
        what = what or f"shapes of {wrong[:3]} differ from its config"
        raise ValueError(f"{source} does not match its IP-Adapter config: {what}")
    adapter.load_state_dict({k: v.float() for k, v in tensors.items()}, assign=True)
    return adapter.eval()


def _config(tensors: Mapping[str, Tensor], metadata: Mapping[str, str], source: str) -> IPAdapterConfig:
    """The config from the metadata, else from the shapes of a linear image projection."""
    if "config" in metadata:
        try:
            data = json.loads(metadata["config"])
        except json.JSONDecodeError as error:
            raise ValueError(f"{source}: the config in its metadata is not JSON ({error})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{source}: the config in its metadata is not a JSON object")
        try:
            return IPAdapterConfig.from_dict(data, source)
        except TypeError as error:
            raise ValueError(str(error)) from None
    proj, norm = tensors.get("image_proj.proj.weight"), tensors.get("image_proj.norm.weight")
    if proj is None or norm is None or proj.ndim != 2 or norm.ndim != 1:
        raise ValueError(
            f"{source} has no IP-Adapter config in its metadata and no linear image projection "
            "(image_proj.proj, image_proj.norm) to infer it from; save it with save_ip_adapter"
        )
    blocks = sorted(int(m.group(1)) for key in tensors if (m := _BLOCK_KEY.fullmatch(key)))
    if blocks != list(range(len(blocks))) or not blocks:
        raise ValueError(f"{source}: ip_adapter blocks must be numbered 0, 1, …; got {blocks[:8]}")
    width = norm.shape[0]
    if proj.shape[0] % width:
        raise ValueError(
            f"{source}: image_proj.proj has {proj.shape[0]} outputs, not tokens of width {width}"
        )
    inner = tuple(tensors[f"ip_adapter.{k}.to_k_ip.weight"].shape[0] for k in blocks)
    return IPAdapterConfig(
        image_dim=proj.shape[1], conditioning_dim=width, inner_dims=inner, num_tokens=proj.shape[0] // width
    )
