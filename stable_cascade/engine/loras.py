"""A job's LoRAs: each a file (absolute path), a scale and the file's sha256; and the LoRAs a preset
needs (the ``lcm`` preset: an LCM LoRA per stage), taken from the model when the user names none."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Sequence
from pathlib import Path

from stable_cascade.engine.hashing import FileHasher, sha256_file
from stable_cascade.fields import checks
from stable_cascade.loading.bundles import BUNDLES
from stable_cascade.lora import metadata_stage, read_lora_metadata

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoraRef:
    """A Stage C LoRA of a job: its file (absolute path), scale and sha256."""

    path: str
    scale: float = 1.0
    sha256: str | None = None

    def validate(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"a LoRA's path must be a file name, got {self.path!r}")
        checks.check_float(f"the scale of LoRA {self.path}", self.scale, -100.0, 100.0)
        if self.sha256 is not None and not isinstance(self.sha256, str):
            raise ValueError(f"the sha256 of LoRA {self.path} must be text, got {self.sha256!r}")


LoraGiven = LoraRef | tuple[str | Path, float]


def resolve_loras(loras: Sequence[LoraGiven]) -> tuple[LoraRef, ...]:
    """The LoRAs with absolute paths and sha256 (a missing file raises ``ValueError``)."""
    if isinstance(loras, (str, Path)) or not isinstance(loras, Sequence):
        raise ValueError(f"loras must be a list of LoRA files with scales, got {loras!r}")
    return tuple(_resolved(lora) for lora in loras)


def _resolved(lora: LoraGiven) -> LoraRef:
    if isinstance(lora, LoraRef):
        ref = lora
    elif isinstance(lora, tuple) and len(lora) == 2:
        ref = LoraRef(str(lora[0]), checks.check_float("LoRA scale", lora[1], -100.0, 100.0))
    else:
        raise ValueError(f"a LoRA is a file with a scale (FILE[:SCALE]), got {lora!r}")
    path = Path(ref.path)
    if not path.is_file():
        raise ValueError(f"LoRA file {ref.path} does not exist; pass an existing .safetensors file")
    return dataclasses.replace(ref, path=str(path.resolve()), sha256=ref.sha256 or sha256_file(path))


STAGE_NAMES = {"prior": "Stage C", "decoder": "Stage B"}


def lora_stage(path: str) -> str:
    """The stage a LoRA file adapts (``prior`` or ``decoder``), from its metadata."""
    return metadata_stage(read_lora_metadata(path), path)


def preset_loras(
    kind: str, loras: tuple[LoraRef, ...], model: str, stages: Sequence[str], own_models: Collection[str]
) -> tuple[LoraRef, ...]:
    """``loras`` and, for each stage in ``stages`` that none of them serves (a file marked ``adapter:
    kind`` for the stage) and that runs the bundle's model (not in ``own_models``, e.g. a fully
    distilled ``--prior``), the bundle ``model``'s ``kind`` LoRA. A stage left without one raises a
    ``ValueError`` that says what to pass."""
    served = set()
    for lora in loras:
        metadata = read_lora_metadata(lora.path)
        if metadata.get("adapter") == kind:
            served.add(metadata_stage(metadata, lora.path))
    needed = [stage for stage in stages if stage not in served and stage not in own_models]
    shipped = BUNDLES[model].adapter_files(kind)
    lacking = [STAGE_NAMES[stage] for stage in needed if stage not in shipped]
    if lacking:
        flags = " ".join(f"--lora {stage}_{kind}.safetensors" for stage in needed)
        raise ValueError(
            f"the {kind} preset needs {kind.upper()} LoRAs for {' and '.join(lacking)}, and the {model} "
            f"model ships none: distil them (stable-cascade train {kind} --stage c|b --teacher MODEL "
            f"--data DIR; see the README) and pass {flags}, or choose another preset"
        )
    return loras + resolve_loras([(shipped[stage], 1.0) for stage in needed])


def hashed(loras: tuple[LoraRef, ...], hasher: FileHasher) -> tuple[LoraRef, ...]:
    """The LoRAs with their files' sha256 now (warning where a recorded one differs)."""
    result = []
    for lora in loras:
        digest = hasher.sha256(lora.path)
        if lora.sha256 is not None and lora.sha256 != digest:
            logger.warning("LoRA %s differs from the one recorded (sha256 %s…)", lora.path, lora.sha256[:12])
        result.append(dataclasses.replace(lora, sha256=digest))
    return tuple(result)
