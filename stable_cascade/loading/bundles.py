"""Named model bundles (data): which repos and files ``--model full|lite|demo`` stand for."""

from __future__ import annotations

import dataclasses
from pathlib import Path

#: The Hub repos of the released prior (Stage C) and decoder (Stage B, Stage A and the extra files).
PRIOR_REPO = "stabilityai/stable-cascade-prior"
DECODER_REPO = "stabilityai/stable-cascade"


@dataclasses.dataclass(frozen=True)
class ModelBundle:
    """A named set of models: the prior and decoder repos (and subfolders), and the original files of
    the parts diffusers repos lack (``owner/repo/file``)."""

    name: str
    description: str
    prior_repo: str = PRIOR_REPO
    decoder_repo: str = DECODER_REPO
    prior_subfolder: str = "prior"
    decoder_subfolder: str = "decoder"
    stage_a: str = f"{DECODER_REPO}/stage_a.safetensors"
    effnet: str = f"{DECODER_REPO}/effnet_encoder.safetensors"
    previewer: str = f"{DECODER_REPO}/previewer.safetensors"
    default_size: int = 1024  # output side when none is given
    #: The smallest side its Stage B makes: one latent pixel at its deepest level (Stage A's 4× · patch
    #: 2 · 2^(levels - 1)).
    min_side: int = 64
    image_encoder: bool = True  # whether the prior has a CLIP image encoder (variation)
    #: The released ControlNets that fit the bundle's Stage C: name → Hub file or local model folder.
    controlnets: tuple[tuple[str, str], ...] = ()
    #: LoRAs shipped for presets that need them (``Preset.adapters``): (kind, stage, file) with stage
    #: ``prior`` or ``decoder``.
    adapters: tuple[tuple[str, str, str], ...] = ()

    def controlnet(self, name: str) -> str | None:
        """Where the bundle's ControlNet ``name`` (canny, inpainting, super_resolution) is, if any."""
        return dict(self.controlnets).get(name)

    def adapter_files(self, kind: str) -> dict[str, str]:
        """The bundle's LoRA files of ``kind`` (e.g. ``lcm``) by stage (``prior``, ``decoder``)."""
        return {stage: file for k, stage, file in self.adapters if k == kind}


#: The ControlNets Stability released for the 3.6B Stage C (``controlnet/<name>.safetensors``).
CONTROLNET_REPO = DECODER_REPO
RELEASED_CONTROLNETS = ("canny", "inpainting", "super_resolution")
_FULL = ModelBundle(
    "full",
    "Stable Cascade: Stage C 3.6B + Stage B 1.5B (Hub)",
    controlnets=tuple(
        (name, f"{CONTROLNET_REPO}/controlnet/{name}.safetensors") for name in RELEASED_CONTROLNETS
    ),
)
#: The small demo cascade shipped inside the package (two pipeline folders; trained on shapes).
DEMO_DIR = Path(__file__).resolve().parents[1] / "demo" / "model"
_DEMO = ModelBundle(
    "demo",
    "the demo cascade shipped with the package: 128x128 coloured shapes, offline",
    prior_repo=str(DEMO_DIR / "prior"),
    decoder_repo=str(DEMO_DIR / "decoder"),
    stage_a=str(DEMO_DIR / "decoder" / "vqgan"),
    effnet=str(DEMO_DIR / "prior" / "effnet"),
    previewer=str(DEMO_DIR / "previewer.safetensors"),
    default_size=128,
    min_side=32,
    image_encoder=False,
    controlnets=(("canny", str(DEMO_DIR / "controlnet")),),
    adapters=tuple(
        ("lcm", stage, str(DEMO_DIR / "lcm" / f"{stage}.safetensors")) for stage in ("prior", "decoder")
    ),
)
BUNDLES: dict[str, ModelBundle] = {
    bundle.name: bundle
    for bundle in (
        _FULL,
        dataclasses.replace(
            _FULL,
            name="lite",
            description="Stable Cascade lite: Stage C 1B + Stage B 700M (Hub)",
            prior_subfolder="prior_lite",
            decoder_subfolder="decoder_lite",
            controlnets=(),  # the released ControlNets are 2048 wide: they fit the 3.6B Stage C only
        ),
        _DEMO,
    )
}
DEFAULT_BUNDLE = "full"
OFFLINE_HINT = (
    "connect to the network once to download it, or pass --prior/--decoder (and --stage-a, --effnet) "
    "pointing to local files; or try the small demo model that ships with the package: --model demo"
)


def get_bundle(name: str) -> ModelBundle:
    if name not in BUNDLES:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(BUNDLES)}")
    return BUNDLES[name]
