"""``Pipeline``: what the prior, decoder and combined pipelines share, with diffusers' pipeline API.

Components and config values are registered by the subclass constructor; ``from_pretrained`` and
``save_pretrained`` read and write diffusers' pipeline layout (``model_index.json`` plus a subfolder
per component, see :mod:`stable_cascade.loading.components`); ``to``, ``device``,
``execution_device``, explicit CPU offload and progress bars follow ``diffusers.DiffusionPipeline``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from stable_cascade.checkpoint import parse_dtype
from stable_cascade.conditioning.text import PromptConditioning, encode_prompts
from stable_cascade.nn.cuda_graphs import GraphFactory
from stable_cascade.nn.unet import StableCascadeUNet
from stable_cascade.pipelines import offload
from stable_cascade.pipelines.compat import DiffusersPipelineMixin
from stable_cascade.pipelines.persistence import PipelineLoading
from stable_cascade.sampling.noise_model import LoopControl
from stable_cascade.sampling.phases import phase

logger = logging.getLogger(__name__)

P = TypeVar("P", bound="Pipeline")
#: diffusers' ``encode_prompt`` result: prompt_embeds, prompt_embeds_pooled and the negative pair.
PromptTuple = tuple[Tensor, Tensor, Tensor | None, Tensor | None]


class Pipeline(PipelineLoading, DiffusersPipelineMixin):
    """Components, config values, diffusers-layout loading and saving, placement and offload.

    A subclass sets ``diffusers_class_name`` (``_class_name`` in ``model_index.json``),
    ``optional_components`` and ``offload_order`` (its models, in the order ``__call__`` uses them), and
    its constructor calls :meth:`register_components` and :meth:`register_config`; ``extra_components``
    are ours only (not in diffusers' pipeline) and left out of :attr:`components` while None. Constructor
    parameters without a default or with default ``None`` are components; the others are config values.
    Class annotations (``prior: StableCascadeUNet``) tell type checkers about the registered attributes.
    """

    offload_order: ClassVar[tuple[str, ...]] = ()
    phase_stage: ClassVar[str] = "pipeline"  # names its timed phases (sampling.phases): "Stage C", …
    model_cpu_offload_seq: ClassVar[str] = ""  # diffusers' form of offload_order: "a->b->c"
    _optional_components: ClassVar[list[str]] = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.model_cpu_offload_seq = "->".join(cls.offload_order)
        cls._optional_components = sorted(
            cls.optional_components
        )  # diffusers' name: components that may be None

    def __init__(self) -> None:
        self._component_names: list[str] = []
        self._config: dict[str, Any] = {}
        self._offload: offload.Offload | None = None
        self._progress_bar_config: dict[str, Any] = {}
        self._loop = LoopControl()

    # -- registration ------------------------------------------------------------------------------

    def register_components(self, **components: Any) -> None:
        """Make each component an attribute of that name and remember it (in order) for saving."""
        for name, component in components.items():
            self._check_name(name)
            setattr(self, name, component)
            if name not in self._component_names:
                self._component_names.append(name)

    def register_config(self, **values: Any) -> None:
        """Make each value an attribute and an entry of :attr:`config` (written to ``model_index.json``)."""
        for name, value in values.items():
            self._check_name(name)
            setattr(self, name, value)
            self._config[name] = value

    def _check_name(self, name: str) -> None:
        if name.startswith("_") or hasattr(Pipeline, name):
            raise ValueError(f"{name!r} cannot name a pipeline component or config value: it is reserved")

    def __repr__(self) -> str:
        parts = [f"{n}={type(c).__name__ if c is not None else None}" for n, c in self.components.items()]
        parts += [f"{k}={v!r}" for k, v in self._config.items()]
        return f"{type(self).__name__}({', '.join(parts)})"

    # -- placement ---------------------------------------------------------------------------------

    def _models(self) -> dict[str, nn.Module]:
        return {name: c for name, c in self.components.items() if isinstance(c, nn.Module)}

    def to(
        self: P,
        device: torch.device | str | torch.dtype | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> P:
        """Move every model to ``device``, cast floating ones to ``dtype``; ``to(torch.float16)`` works."""
        if isinstance(device, torch.dtype):
            if dtype is not None:
                raise TypeError(f"to() got two dtypes: {device} and {dtype}")
            device, dtype = None, device
        if device is not None and self._offload is not None:
            raise ValueError(
                f"CPU offload ({self._offload.mode}) decides where models are; call disable_offload() "
                f"before to({str(device)!r})"
            )
        dtype = parse_dtype(dtype)
        for model in self._models().values():
            floating = any(p.is_floating_point() for p in model.parameters())
            model.to(device=device, dtype=dtype if floating else None)
        return self

    @property
    def device(self) -> torch.device:
        """Where the first model's parameters are (the CPU when there are none)."""
        for model in self._models().values():
            for parameter in model.parameters():
                return parameter.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the first ``StableCascadeUNet`` component (else of the first floating model)."""
        models = self._models().values()
        for model in (*(m for m in models if isinstance(m, StableCascadeUNet)), *models):
            for parameter in model.parameters():
                if parameter.is_floating_point():
                    return parameter.dtype
        return torch.float32

    @property
    def execution_device(self) -> torch.device:
        """Where inputs must be and models run: the offload device when offload is on, else :attr:`device`."""
        return self._offload.device if self._offload is not None else self.device

    # -- speed -------------------------------------------------------------------------------------

    def enable_cuda_graphs(self, make_graph: GraphFactory | None = None) -> None:
        """Replay every UNet's sampling steps from CUDA graphs (see
        :meth:`StableCascadeUNet.enable_cuda_graphs`); the models must be on a CUDA device."""
        if self._offload is not None:
            raise ValueError(
                f"CUDA graphs replay fixed weight addresses, which CPU offload ({self._offload.mode}) moves; "
                "call disable_offload() and .to('cuda') first"
            )
        for model in self._models().values():
            if isinstance(model, StableCascadeUNet):
                model.enable_cuda_graphs(make_graph)

    def disable_cuda_graphs(self) -> None:
        for model in self._models().values():
            if isinstance(model, StableCascadeUNet):
                model.disable_cuda_graphs()

    # -- offload -----------------------------------------------------------------------------------

    def enable_model_cpu_offload(
        self, gpu_id: int | None = None, device: torch.device | str | None = None
    ) -> None:
        """Keep models on the CPU; :meth:`activate` moves the one about to run to ``device``."""
        target = offload.execution_device("enable_model_cpu_offload", gpu_id, device)
        self._start_offload()
        self._offload = offload.Offload("model", target)

    def enable_sequential_cpu_offload(
        self, gpu_id: int | None = None, device: torch.device | str | None = None
    ) -> None:
        """Keep weights on the CPU; each module's own tensors visit ``device`` only during its forward."""
        target = offload.execution_device("enable_sequential_cpu_offload", gpu_id, device)
        self._start_offload()
        self._offload = offload.Offload(
            "sequential", target, offload.attach_sequential_hooks(self._models().values(), target)
        )

    def use_execution_device(self, device: torch.device | str) -> None:
        """Run on ``device`` while another pipeline's offload places the models (shared components)."""
        self.disable_offload()
        self._offload = offload.Offload("sequential", torch.device(device))

    def disable_offload(self) -> None:
        """Stop offloading; the models stay where they are (the CPU), so call :meth:`to` next."""
        if self._offload is not None:
            self._offload.remove()
            self._offload = None

    def _start_offload(self) -> None:
        self.disable_offload()
        stray = sorted(set(self._models()) - set(self.offload_order))
        if stray:
            raise TypeError(
                f"{type(self).__name__}.offload_order {self.offload_order} lacks model(s) {', '.join(stray)}"
            )
        for model in self._models().values():
            offload.place(model, offload.CPU)

    def activate(self, name: str) -> Any:
        """Component ``name``; with model offload, moved to the execution device and the others to the CPU."""
        if name not in self._component_names:
            raise ValueError(
                f"{type(self).__name__} has no component {name!r}; it has: {', '.join(self._component_names)}"
            )
        component = getattr(self, name)
        state = self._offload
        if state is None or state.mode != "model" or not isinstance(component, nn.Module):
            return component
        if name not in self.offload_order:
            raise TypeError(f"{type(self).__name__}.offload_order {self.offload_order} lacks {name!r}")
        for other in self.offload_order:
            model = getattr(self, other, None)
            if other != name and isinstance(model, nn.Module):
                offload.place(model, offload.CPU)
        offload.place(component, state.device)
        return component

    def maybe_free_model_hooks(self) -> None:
        """diffusers' name for :meth:`offload_all`."""
        self.offload_all()

    def offload_all(self) -> None:
        """With model offload, move every model back to the CPU (pipelines call it when done)."""
        if self._offload is not None and self._offload.mode == "model":
            for name in self.offload_order:
                model = getattr(self, name, None)
                if isinstance(model, nn.Module):
                    offload.place(model, offload.CPU)

    # -- text ---------------------------------------------------------------------------------------

    def encode_prompt(
        self,
        device: torch.device | str | None = None,
        batch_size: int | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool | None = None,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: Tensor | None = None,
        prompt_embeds_pooled: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        negative_prompt_embeds_pooled: Tensor | None = None,
        *,
        guidance: bool | None = None,
        dtype: torch.dtype | None = None,
    ) -> PromptConditioning | PromptTuple:
        """Text conditioning of both CFG branches, in diffusers' form or ours.

        diffusers' call (``do_classifier_free_guidance`` given, by position or name) returns its tuple
        ``(prompt_embeds, prompt_embeds_pooled, negative_prompt_embeds, negative_prompt_embeds_pooled)``,
        one row per image, the negatives None without guidance. Ours (``guidance=``) returns a
        :class:`PromptConditioning`. ``device`` defaults to :attr:`execution_device`.
        """
        if (do_classifier_free_guidance is None) == (guidance is None):
            raise TypeError(
                "encode_prompt takes do_classifier_free_guidance (diffusers' form, returns a 4-tuple) or "
                "guidance= (returns PromptConditioning): pass exactly one"
            )
        text = self.text_conditioning(
            device=device,
            prompt=prompt,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            prompt_embeds_pooled=prompt_embeds_pooled,
            negative_prompt_embeds=negative_prompt_embeds,
            negative_prompt_embeds_pooled=negative_prompt_embeds_pooled,
            num_images_per_prompt=num_images_per_prompt,
            guidance=bool(do_classifier_free_guidance if guidance is None else guidance),
            dtype=dtype,
        )
        if guidance is not None:
            return text
        if batch_size is not None and batch_size != text.batch_size:
            raise ValueError(f"batch_size is {batch_size} but {text.batch_size} prompt(s) were given")
        negative = (None, None) if text.uncond is None else (text.uncond.hidden, text.uncond.pooled)
        return text.cond.hidden, text.cond.pooled, *negative

    def text_conditioning(
        self, device: torch.device | str | None = None, **arguments: Any
    ) -> PromptConditioning:
        """The one text path (:func:`conditioning.text.encode_prompts`) through the pipeline's
        ``tokenizer`` and ``text_encoder``."""
        text_encoder = self.activate("text_encoder")
        tokenizer = getattr(self, "tokenizer", None)
        device = device or self.execution_device
        with phase(f"{self.phase_stage} text encoding"):
            return encode_prompts(tokenizer, text_encoder, device=device, **arguments)

    # -- progress bars -----------------------------------------------------------------------------

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """tqdm options for :meth:`progress_bar` (``disable=True``, ``desc=...``); replaces earlier ones."""
        self._progress_bar_config = dict(kwargs)

    def progress_bar(self, iterable: Iterable[Any] | None = None, total: int | None = None) -> tqdm:
        """A ``tqdm.auto`` bar over ``iterable`` or for ``total`` steps, with the configured options."""
        if iterable is None and total is None:
            raise ValueError("progress_bar needs an iterable or a total")
        return tqdm(iterable, total=total, **self._progress_bar_config)
