"""``Pipeline``: what the prior, decoder and combined pipelines share, with diffusers' pipeline API.

Components and config values are registered by the subclass constructor; ``from_pretrained`` and
``save_pretrained`` read and write diffusers' pipeline layout (``model_index.json`` plus a subfolder
per component, see :mod:`stable_cascade.loading.components`); ``to``, ``device``,
``execution_device``, explicit CPU offload and progress bars follow ``diffusers.DiffusionPipeline``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from stable_cascade.checkpoint import CheckpointError, HubOptions, parse_dtype
from stable_cascade.conditioning.text import PromptConditioning, encode_prompts
from stable_cascade.loading.components import (
    MODEL_INDEX,
    PipelineConfig,
    component_entry,
    is_component_entry,
    load_component,
    read_model_index,
    save_component,
    write_model_index,
)
from stable_cascade.nn.unet import StableCascadeUNet
from stable_cascade.pipelines import offload

logger = logging.getLogger(__name__)

P = TypeVar("P", bound="Pipeline")


class Pipeline:
    """Components, config values, diffusers-layout loading and saving, placement and offload.

    A subclass sets ``diffusers_class_name`` (``_class_name`` in ``model_index.json``),
    ``optional_components`` and ``offload_order`` (its models, in the order ``__call__`` uses them), and
    its constructor calls :meth:`register_components` and :meth:`register_config`. Constructor
    parameters without a default or with default ``None`` are components; the others are config values.
    Class annotations (``prior: StableCascadeUNet``) tell type checkers about the registered attributes.
    """

    diffusers_class_name: ClassVar[str] = ""
    optional_components: ClassVar[frozenset[str]] = frozenset()
    offload_order: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self._component_names: list[str] = []
        self._config: dict[str, Any] = {}
        self._offload: offload.Offload | None = None
        self._progress_bar_config: dict[str, Any] = {}

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

    @property
    def config(self) -> PipelineConfig:
        return PipelineConfig(self._config)

    @property
    def components(self) -> dict[str, Any]:
        """Name → component (``None`` for absent optional ones), enough to build another pipeline."""
        return {name: getattr(self, name) for name in self._component_names}

    @classmethod
    def component_names(cls) -> tuple[str, ...]:
        """The constructor's component parameters."""
        return tuple(
            n
            for n, p in cls._parameters().items()
            if p.default is inspect.Parameter.empty or p.default is None
        )

    @classmethod
    def config_names(cls) -> tuple[str, ...]:
        """The constructor's config parameters (those with a default other than ``None``)."""
        return tuple(n for n in cls._parameters() if n not in cls.component_names())

    @classmethod
    def _parameters(cls) -> dict[str, inspect.Parameter]:
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]  # without self
        variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        return {p.name: p for p in parameters if p.kind not in variadic}

    def __repr__(self) -> str:
        parts = [f"{n}={type(c).__name__ if c is not None else None}" for n, c in self.components.items()]
        parts += [f"{k}={v!r}" for k, v in self._config.items()]
        return f"{type(self).__name__}({', '.join(parts)})"

    # -- loading and saving ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls: type[P],
        path_or_repo_id: str | Path,
        *,
        torch_dtype: torch.dtype | str | None = None,
        variant: str | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
        subfolders: Mapping[str, str] | None = None,
        **components: Any,
    ) -> P:
        """Load a pipeline folder or Hub repo written by diffusers or by :meth:`save_pretrained`.

        Components passed by name are used as given (``from_pretrained(repo, prior=unet)``), as are
        config values; ``subfolders`` loads a component from another folder of the repo
        (``{"prior": "prior_lite"}``). Models are cast to ``torch_dtype`` (float32 when not given).
        """
        hub = HubOptions(revision, cache_dir, local_files_only, token)
        subfolders = dict(subfolders or {})
        cls._check_arguments(components, subfolders)
        dtype = parse_dtype(torch_dtype)
        index = read_model_index(path_or_repo_id, hub)
        cls._check_class_name(index, path_or_repo_id)
        unused = sorted(k for k in index if not k.startswith("_") and k not in cls._parameters())
        if unused:
            logger.warning("%s: ignoring entries unknown to %s: %s", path_or_repo_id, cls.__name__, unused)
        kwargs = {name: index[name] for name in cls.config_names() if name in index}
        for name in cls.component_names():
            if name in components:
                continue
            library, class_name = cls._index_entry(index, name, path_or_repo_id)
            if library is None or class_name is None:
                if name in subfolders:
                    raise ValueError(f"subfolders names {name!r}, which {MODEL_INDEX} declares absent")
                kwargs[name] = None
                continue
            kwargs[name] = load_component(
                path_or_repo_id,
                name,
                library,
                class_name,
                subfolder=subfolders.get(name, name),
                torch_dtype=dtype,
                variant=variant,
                hub=hub,
            )
        return cls(**{**kwargs, **components})

    @classmethod
    def _check_arguments(cls, components: Mapping[str, Any], subfolders: Mapping[str, str]) -> None:
        valid = ", ".join(cls.component_names())
        unknown = sorted(set(components) - set(cls._parameters()))
        if unknown:
            raise TypeError(
                f"{cls.__name__}.from_pretrained got unexpected argument(s) {', '.join(unknown)}; "
                f"components: {valid}; config values: {', '.join(cls.config_names()) or 'none'}"
            )
        unknown = sorted(set(subfolders) - set(cls.component_names()))
        if unknown:
            raise TypeError(
                f"subfolders names unknown component(s) {', '.join(unknown)}; components: {valid}"
            )
        both = sorted(set(components) & set(subfolders))
        if both:
            raise TypeError(f"{', '.join(both)}: pass a component or its subfolder, not both")

    @classmethod
    def _check_class_name(cls, index: Mapping[str, Any], path_or_repo_id: str | Path) -> None:
        if not cls.diffusers_class_name:
            raise TypeError(f"{cls.__name__} is abstract: call from_pretrained on a concrete pipeline class")
        found = index.get("_class_name")
        if found in (cls.diffusers_class_name, cls.__name__):
            return
        where = f"the {MODEL_INDEX} of {str(path_or_repo_id)!r}"
        if not isinstance(found, str):
            raise ValueError(f"{where} has no '_class_name'; is it a pipeline's {MODEL_INDEX}?")
        candidates = [c.__name__ for c in _subclasses(Pipeline) if c.diffusers_class_name == found]
        ours = found if not candidates or found in candidates else candidates[0]
        raise ValueError(
            f"{where} describes a {found}, not a {cls.diffusers_class_name}; load it with "
            f"{ours}.from_pretrained instead"
        )

    @classmethod
    def _index_entry(
        cls, index: Mapping[str, Any], name: str, path_or_repo_id: str | Path
    ) -> tuple[str | None, str | None]:
        """A component's ``[library, class]``; ``(None, None)`` for an absent optional one."""
        if name not in index:
            if name in cls.optional_components:
                return None, None
            raise ValueError(
                f"the {MODEL_INDEX} of {str(path_or_repo_id)!r} has no entry for the required "
                f"component {name!r}; pass it yourself ({name}=...)"
            )
        entry = index[name]
        if not is_component_entry(entry):
            raise CheckpointError(
                f"{MODEL_INDEX}: component {name!r} must be [library, class], got {entry!r}"
            )
        return entry[0], entry[1]

    @classmethod
    def describes_self(cls, path_or_repo_id: str | Path, options: Mapping[str, Any] | None = None) -> bool:
        """Whether the ``model_index.json`` there names this pipeline class (``options``: Hub options)."""
        options = options or {}
        hub = HubOptions(*(options.get(k) for k in ("revision", "cache_dir", "local_files_only", "token")))
        return read_model_index(path_or_repo_id, hub).get("_class_name") in (
            cls.diffusers_class_name,
            cls.__name__,
        )

    def save_pretrained(self, directory: str | Path, variant: str | None = None) -> None:
        """Write each component to its subfolder and ``model_index.json``, as diffusers does."""
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        entries: dict[str, Any] = {}
        for name, component in self.components.items():
            if component is None:
                entries[name] = [None, None]
                continue
            entries[name] = list(component_entry(component))
            save_component(component, root / name, variant)
        write_model_index(root, self.diffusers_class_name or type(self).__name__, {**entries, **self._config})

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

    def offload_all(self) -> None:
        """With model offload, move every model back to the CPU (pipelines call it when done)."""
        if self._offload is not None and self._offload.mode == "model":
            for name in self.offload_order:
                model = getattr(self, name, None)
                if isinstance(model, nn.Module):
                    offload.place(model, offload.CPU)

    # -- text ---------------------------------------------------------------------------------------

    def encode_prompt(self, **arguments: Any) -> PromptConditioning:
        """Text conditioning of both CFG branches through the pipeline's ``tokenizer`` and
        ``text_encoder`` (the one text path, :func:`conditioning.text.encode_prompts`)."""
        text_encoder = self.activate("text_encoder")
        tokenizer = getattr(self, "tokenizer", None)
        return encode_prompts(tokenizer, text_encoder, device=self.execution_device, **arguments)

    # -- progress bars -----------------------------------------------------------------------------

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """tqdm options for :meth:`progress_bar` (``disable=True``, ``desc=...``); replaces earlier ones."""
        self._progress_bar_config = dict(kwargs)

    def progress_bar(self, iterable: Iterable[Any] | None = None, total: int | None = None) -> tqdm:
        """A ``tqdm.auto`` bar over ``iterable`` or for ``total`` steps, with the configured options."""
        if iterable is None and total is None:
            raise ValueError("progress_bar needs an iterable or a total")
        return tqdm(iterable, total=total, **self._progress_bar_config)


def _subclasses(cls: type[Pipeline]) -> Iterator[type[Pipeline]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)
