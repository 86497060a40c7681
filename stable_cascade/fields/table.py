"""The job fields, in the order the page's form and ``--help`` show them.

Adding a setting to every front end is one row here (plus the ``Job`` attribute and the engine code
that uses it): ``docs/ARCHITECTURE.md`` walks through it.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from stable_cascade.diffusion.presets import COMBINED_PRESETS, DEFAULT_PRESET, SAMPLER_NAMES
from stable_cascade.fields import checks
from stable_cascade.fields.field import Field, FrontEnd
from stable_cascade.limits import MAX_SEED, MAX_SIDE, MAX_STEPS
from stable_cascade.loading.bundles import BUNDLES, DEFAULT_BUNDLE
from stable_cascade.specs.controlnet import ControlType

Task = Literal["txt2img", "img2img", "variation", "reconstruct"]
TASKS: tuple[str, ...] = get_args(Task)
DTYPES = ("auto", "bf16", "fp16", "fp32")
CONTROL_TYPES: tuple[str, ...] = get_args(ControlType)
#: The tasks that run Stage C (reconstruct runs Stage B and Stage A only).
PRIOR_TASKS = ("txt2img", "img2img", "variation")
#: The settings of each stage: the fields ``prior_<key>`` and ``decoder_<key>``, a preset's stage settings.
STAGE_KEYS = ("steps", "guidance", "sampler", "shift", "rescale")
IMAGE_TASKS = ("img2img", "variation", "reconstruct")
#: AUTOMATIC1111's sampler names → ours (A1111 lists them as ``name``; ours are aliases too).
A1111_SAMPLERS = {
    "Euler a": "euler_ancestral",
    "DDIM": "ddim",
    "DPM++ 2M": "dpmpp_2m",
    "DDPM": "ddpm",
    "LCM": "lcm",
    "k_euler_a": "euler_ancestral",
    "k_euler_ancestral": "euler_ancestral",
    "k_dpmpp_2m": "dpmpp_2m",
}
#: How prompt weighting acts (AUTOMATIC1111's "Emphasis" setting, its names → ours).
A1111_EMPHASES = {"Original": "original", "No norm": "no_norm", "Ignore": "ignore", "None": "none"}
EMPHASES: tuple[str, ...] = tuple(A1111_EMPHASES.values())
_REFERENCE = COMBINED_PRESETS[DEFAULT_PRESET]

NAMED_MODELS_ONLY: dict[FrontEnd, str] = {
    "a1111": "the server runs named models only: requests never name files",
    "api": "the server runs named models only: requests never name files",
    "form": "the server runs named models only: requests never name files",
    "batch": "one set of models serves a whole batch run: pass it to stable-cascade batch",
    "infotext": "the text names the models briefly (Model: …); the JSON record has the files",
}
DERIVED_HASH: dict[FrontEnd, str] = {
    "cli": "computed from the file",
    "a1111": "computed from the upload",
    "api": "computed from the upload",
    "batch": "computed from the file",
    "form": "computed from the upload",
    "infotext": "the JSON record carries the files' sha256",
}
_NOT_IN_TEXT: dict[FrontEnd, str] = {"infotext": "the JSON record carries it"}
_PROMPT_IMAGES = "the JSON record carries the images' files, strengths and sha256"


def _stage_fields(stage: Literal["prior", "decoder"]) -> tuple[Field, ...]:
    """The five sampling settings of one stage (``prior_steps`` … ``decoder_rescale``)."""
    preset = getattr(_REFERENCE, stage)
    name = "Stage C" if stage == "prior" else "Stage B"
    tasks = PRIOR_TASKS if stage == "prior" else ()
    derived = f"the preset's {name} value"
    first = stage == "prior"  # Stage C's settings take AUTOMATIC1111's own names and infotext keys

    def label(key: str) -> str:  # "Steps" (Stage C, A1111's key), "Stage B steps", "Stage B CFG scale"
        return key if first else f"Stage B {key if key.startswith('CFG') else key.lower()}"

    return (
        Field(f"{stage}_steps", "int", f"{name} steps", f"{name} sampling steps", name,
              preset.steps, derived, low=1, high=MAX_STEPS, tasks=tasks,
              cli=(f"--{stage}-steps",), a1111="steps" if first else None, infotext=label("Steps"),
              widget="number"),
        Field(f"{stage}_guidance", "float", f"{name} guidance", f"{name} classifier-free guidance scale",
              name, preset.guidance, derived, low=0.0, high=100.0, tasks=tasks,
              cli=(f"--{stage}-guidance",), a1111="cfg_scale" if first else None, infotext=label("CFG scale"),
              widget="number"),
        Field(f"{stage}_sampler", "choice", f"{name} sampler", f"{name} sampler", name, preset.sampler,
              derived, choices=SAMPLER_NAMES, choice_names=A1111_SAMPLERS, tasks=tasks,
              cli=(f"--{stage}-sampler",), a1111="sampler_name" if first else None, infotext=label("Sampler"),
              widget="select"),
        Field(f"{stage}_shift", "float", f"{name} shift", f"{name} logSNR shift (1: none)", name,
              preset.shift, derived, low=0.0, high=100.0, open_low=True, tasks=tasks,
              cli=(f"--{stage}-shift", "--shift") if first else (f"--{stage}-shift",),
              infotext=label("Shift"), widget="number"),
        Field(f"{stage}_rescale", "float", f"{name} guidance rescale",
              f"{name} guidance rescale (0: none, 1: full)", name, preset.rescale, derived, low=0.0,
              high=1.0, tasks=tasks, cli=(f"--{stage}-rescale",), infotext=label("CFG rescale"),
              widget="number"),
    )  # fmt: skip


def _model_field(name: str, label: str, help: str, tasks: tuple[str, ...] = ()) -> Field:
    return Field(name, "name", label, help, "Models", optional=True, tasks=tasks,
                 cli=(f"--{name.replace('_', '-')}",), why_not=NAMED_MODELS_ONLY)  # fmt: skip


_SPEC = "a Hub repo id, a diffusers pipeline or model folder, or a single file / ComfyUI bundle"
FIELDS: tuple[Field, ...] = (
    Field("task", "choice", "task", "what to make", "Prompt", "txt2img", choices=TASKS, widget="select",
          infotext="Task", why_not={
              "cli": "the command is the task: generate (txt2img), img2img, variation, reconstruct",
              "a1111": "the route is the task: /sdapi/v1/txt2img or /sdapi/v1/img2img"}),
    Field("prompt", "text", "prompt", "the text prompt", "Prompt", "", cli=("PROMPT",), a1111="prompt",
          widget="textarea", why_not={"infotext": "the text's first lines"}),
    Field("negative_prompt", "text", "negative prompt", "what to avoid", "Prompt", "",
          cli=("--negative-prompt",), a1111="negative_prompt", widget="textarea",
          why_not={"infotext": "the text's 'Negative prompt:' line"}),
    Field("emphasis", "choice", "emphasis", "what (word:1.2), (word), [word] and BREAK in a prompt do, as "
          "AUTOMATIC1111's Emphasis setting: original (weights, the mean kept), no_norm (weights alone), "
          "ignore (the syntax is read, weights are not applied), none (the text is encoded as written)",
          "Prompt", "original", choices=EMPHASES, choice_names=A1111_EMPHASES, cli=("--emphasis",),
          a1111="emphasis", infotext="Emphasis", widget="select"),
    Field("input_image", "image", "input image", "the image img2img, variation and reconstruct start from",
          "Input image", optional=True, tasks=IMAGE_TASKS, cli=("IMAGE",), a1111="init_images",
          widget="image", aliases=("image",), why_not=_NOT_IN_TEXT),
    Field("input_image_sha256", "sha256", "input image's sha256", "the sha256 of its pixels",
          "Input image", derived="the sha256 of the input image's pixels", tasks=IMAGE_TASKS,
          why_not=DERIVED_HASH),
    Field("strength", "float", "strength", "how much of the image to replace: 0 keeps it, 1 ignores it",
          "Input image", 0.8, "0.8 (the reference notebook's)", low=0.0, high=1.0, tasks=("img2img",),
          cli=("--strength",), a1111="denoising_strength", infotext="Denoising strength",
          widget="number"),
    Field("image_prompts", "image_prompts", "image prompts", "images that prompt Stage C together with the "
          "text, each FILE[:STRENGTH] (the strength, 1.0, multiplies its CLIP image embedding; 0 leaves it "
          "out)", "Image prompts", (), tasks=PRIOR_TASKS, cli=("--image-prompt",), widget="image_prompts",
          why_not={"a1111": "the ControlNet extension's IP-Adapter units (alwayson_scripts), weight: "
                   "strength", "infotext": _PROMPT_IMAGES}),
    Field("negative_image_prompts", "image_prompts", "negative image prompts", "images whose content to "
          "steer away from (the unconditional branch of guidance), each FILE[:STRENGTH]", "Image prompts", (),
          tasks=PRIOR_TASKS, cli=("--negative-image-prompt",), widget="image_prompts",
          why_not={"a1111": "A1111's requests have none: send them to the native API (POST /v1/jobs)",
                   "infotext": _PROMPT_IMAGES}),
    Field("width", "int", "width", "image width, a multiple of 8", "Size and seed", checks.DEFAULT_SIZE,
          "the model's native size (1024; the demo: 128); reconstruct: the input image's", low=1,
          high=MAX_SIDE, cli=("--width",), a1111="width", infotext="Size", widget="number"),
    Field("height", "int", "height", "image height, a multiple of 8", "Size and seed",
          checks.DEFAULT_SIZE, "as width", low=1, high=MAX_SIDE, cli=("--height",), a1111="height",
          infotext="Size", widget="number"),
    Field("seed", "int", "seed", "seed of the first image; image i gets seed + i", "Size and seed", 0,
          "random", low=0, high=MAX_SEED, cli=("--seed",), a1111="seed", infotext="Seed",
          widget="number"),
    Field("batch_size", "int", "batch size", "images per batch (one model call)", "Size and seed", 1,
          low=1, high=checks.MAX_BATCH_SIZE, cli=("--batch-size",), a1111="batch_size", widget="number",
          why_not={"batch": "items make one image per row; --batch-size sets the rows of a model call",
                   "infotext": "each image's text is its own, with its own seed"}),
    Field("count", "int", "count", "number of batches", "Size and seed", 1, low=1,
          high=checks.MAX_COUNT, cli=("--count",), a1111="n_iter", widget="number",
          why_not={"infotext": "each image's text is its own, with its own seed"}),
    Field("preset", "choice", "preset", "the sampler settings both stages start from", "Sampling",
          DEFAULT_PRESET, choices=tuple(COMBINED_PRESETS), cli=("--preset",), infotext="Preset",
          widget="select"),
    *_stage_fields("prior"),
    *_stage_fields("decoder"),
    Field("model", "choice", "model", "a named model: " + ", ".join(
              f"{n} ({b.description})" for n, b in BUNDLES.items()), "Models", DEFAULT_BUNDLE,
          choices=tuple(BUNDLES), cli=("--model",), a1111="sd_model_checkpoint", infotext="Model",
          widget="select"),
    _model_field("prior", "Stage C model", f"Stage C: {_SPEC}", PRIOR_TASKS),
    _model_field("decoder", "Stage B model", f"Stage B: {_SPEC}"),
    _model_field("stage_a", "Stage A model", "Stage A (VQGAN) single file"),
    _model_field("effnet", "EfficientNet encoder", "EfficientNet encoder single file (img2img, reconstruct)"),
    _model_field("previewer", "previewer", "Stage C previewer single file (previews)", PRIOR_TASKS),
    _model_field("components", "components", "repo id or folder with the tokenizer and CLIP encoders "
                 "for single files"),
    Field("loras", "loras", "LoRAs", "Stage C LoRAs (ours, kohya/OneTrainer or Stability's format) and "
          "Stage B ones (ours, marked stage=decoder), each FILE[:SCALE] (scale 1.0); the server takes "
          "them by name from its models folder", "Models", (),
          "none; the lcm preset: the model's LCM LoRAs", tasks=PRIOR_TASKS, cli=("--lora",), widget="loras",
          why_not={"a1111": "named in the prompt as <lora:name:weight>, as AUTOMATIC1111 reads them",
                   "batch": NAMED_MODELS_ONLY["batch"],
                   "infotext": "written into the prompt as <lora:name:weight>, as AUTOMATIC1111 writes "
                   "them; the JSON record has the files and their sha256"}),
    Field("ip_adapters", "ip_adapters", "IP-Adapters", "Stage C IP-Adapters (the image prompts through "
          "decoupled attention), each FILE[:SCALE] (scale 1.0; 0: the model without it); the server takes "
          "them by name from its models folder", "Models", (), tasks=PRIOR_TASKS, cli=("--ip-adapter",),
          why_not={"a1111": "its ControlNet units' IP-Adapter images are image prompts; the API names "
                   "IP-Adapters", "form": "the page sends image prompts; the API names IP-Adapters",
                   "batch": NAMED_MODELS_ONLY["batch"],
                   "infotext": "the JSON record has the IP-Adapter files and their sha256"}),
    Field("dtype", "choice", "dtype", "auto: bf16 on CUDA with bf16 support, else fp32", "Models", "auto",
          choices=DTYPES, cli=("--dtype",), widget="select",
          why_not={"batch": "one dtype serves a whole batch run: pass --dtype to stable-cascade batch",
                   **_NOT_IN_TEXT}),
    Field("controlnet", "name", "ControlNet", "a released ControlNet of the model (canny, inpainting, "
          "super_resolution) or a ControlNet file or folder", "ControlNet", optional=True,
          tasks=PRIOR_TASKS, cli=("--controlnet",), infotext="ControlNet", widget="select",
          why_not={"a1111": "sent as a ControlNet-extension unit (alwayson_scripts) or img2img's mask",
                   "infotext": "written for people; the JSON record has the ControlNet and its images"}),
    Field("control_image", "image", "control image", "the image that steers the result "
          "(super_resolution: the small image)", "ControlNet", requires="controlnet",
          cli=("--control-image",), widget="image",
          why_not={"a1111": "the ControlNet unit's input_image", **_NOT_IN_TEXT}),
    Field("control_image_sha256", "sha256", "control image sha256", "the sha256 of the control image's "
          "pixels", "ControlNet", requires="controlnet", why_not=DERIVED_HASH),
    Field("mask", "image", "mask", "inpainting: white where new content is generated", "ControlNet",
          optional=True, requires="controlnet", cli=("--mask",), widget="image",
          why_not={"a1111": "img2img's mask (with inpainting_mask_invert)", **_NOT_IN_TEXT}),
    Field("mask_sha256", "sha256", "mask sha256", "the sha256 of the mask's pixels", "ControlNet",
          requires="mask", why_not=DERIVED_HASH),
    Field("control_type", "choice", "control type", "the control a ControlNet file takes (when it "
          "cannot tell)", "ControlNet", derived="the ControlNet's own", choices=CONTROL_TYPES,
          requires="controlnet", cli=("--control-type",), infotext="Control type",
          why_not={"a1111": "the ControlNet unit's module", "form": "the released ControlNets' names are "
                   "their types", "infotext": "written for people; the JSON record has it"}),
    Field("control_scale", "float", "control scale", "the ControlNet's strength, 0-10", "ControlNet", 1.0,
          "1.0", low=0.0, high=checks.MAX_CONTROL_SCALE, requires="controlnet", cli=("--control-scale",),
          infotext="Control scale", widget="number",
          why_not={"a1111": "the ControlNet unit's weight",
                   "infotext": "written for people; the JSON record has it"}),
    Field("controlnet_sha256", "sha256", "ControlNet sha256", "the sha256 of a ControlNet file",
          "ControlNet", optional=True, requires="controlnet", why_not=DERIVED_HASH),
)  # fmt: skip
BY_NAME: dict[str, Field] = {field.name: field for field in FIELDS}
#: Earlier names (``image``, ``sampler_index``) → the fields that took them over.
ALIASES: dict[str, str] = {alias: field.name for field in FIELDS for alias in field.aliases}


def defaults() -> dict[str, Any]:
    """The values of a directly built ``Job()`` (a txt2img job): None where a field does not apply."""
    return {field.name: field.default if field.applies("txt2img", {}) else field.empty for field in FIELDS}
