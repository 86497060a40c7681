"""Loading and saving of pipelines in diffusers' layout: ``model_index.json`` plus a subfolder per
component (see :mod:`stable_cascade.loading.components`), and ``push_to_hub``.

The constructor's signature says what a pipeline holds: parameters without a default or with default
``None`` are components, the others config values.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from stable_cascade.checkpoint import CheckpointError, HubOptions, parse_dtype
from stable_cascade.checkpoint.hub import check_safe_serialization, save_and_upload, upload_folder
from stable_cascade.checkpoint.pretrained import pick_dtype
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
from stable_cascade.pipelines.compat import component_dtype, has_variant

logger = logging.getLogger(__name__)

L = TypeVar("L", bound="PipelineLoading")


class PipelineLoading:
    """``from_pretrained`` / ``save_pretrained`` / ``push_to_hub`` and the component bookkeeping they use.

    ``extra_components`` are ours only (not in diffusers' pipeline) and left out of
    :attr:`components` while None.
    """

    diffusers_class_name: ClassVar[str] = ""
    optional_components: ClassVar[frozenset[str]] = frozenset()
    extra_components: ClassVar[frozenset[str]] = frozenset()
    _component_names: list[str]
    _config: dict[str, Any]
    _name_or_path: str | None = None

    @property
    def config(self) -> PipelineConfig:
        return PipelineConfig(self._config)

    @property
    def components(self) -> dict[str, Any]:
        """Name → component (``None`` for absent optional ones), enough to build another pipeline;
        as in diffusers, our extra components (``effnet``, ``previewer``) only when set."""
        named = {name: getattr(self, name) for name in self._component_names}
        return {k: v for k, v in named.items() if v is not None or k not in self.extra_components}

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

    # -- loading and saving ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls: type[L],
        path_or_repo_id: str | Path,
        *,
        torch_dtype: torch.dtype | str | Mapping[str, torch.dtype | str] | None = None,
        dtype: torch.dtype | str | Mapping[str, torch.dtype | str] | None = None,
        variant: str | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
        subfolders: Mapping[str, str] | None = None,
        **components: Any,
    ) -> L:
        """Load a pipeline folder or Hub repo written by diffusers or by :meth:`save_pretrained`.

        Components passed by name are used as given (``from_pretrained(repo, prior=unet)``), as are
        config values; ``subfolders`` loads a component from another folder of the repo
        (``{"prior": "prior_lite"}``). Models are cast to ``dtype`` (alias ``torch_dtype``; float32 when
        not given), or per component with a dict as in diffusers: ``{"prior": torch.bfloat16,
        "default": torch.float16}`` (components neither named nor covered by ``"default"``: float32).
        A ``variant`` that no component has raises ``ValueError``, as in diffusers.
        """
        hub = HubOptions(revision, cache_dir, local_files_only, token)
        subfolders = dict(subfolders or {})
        cls._check_arguments(components, subfolders)
        dtypes = pick_dtype(torch_dtype, dtype)
        index = read_model_index(path_or_repo_id, hub)
        cls._check_class_name(index, path_or_repo_id)
        if variant is not None and not has_variant(path_or_repo_id, variant):
            raise ValueError(
                f"You are trying to load the model files of the `variant={variant}`, but no such modeling "
                f"files are available in {path_or_repo_id}; leave variant=None or save that variant first"
            )
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
                torch_dtype=component_dtype(dtypes, name),
                variant=variant,
                hub=hub,
            )
        pipeline = cls(**{**kwargs, **components})
        pipeline._name_or_path = str(path_or_repo_id)
        return pipeline

    @classmethod
    def from_pipe(cls: type[L], pipeline: PipelineLoading, **kwargs: Any) -> L:
        """A pipeline of this class built from ``pipeline``'s components and config values, sharing its
        models (nothing is copied), as diffusers' ``from_pipe``.

        Components and config values given by name replace ``pipeline``'s; ``torch_dtype`` (or ``dtype``)
        casts the models, which ``pipeline`` shares. Unlike diffusers, models keep their dtype when none
        is given (diffusers casts them to float32, the source pipeline's included).
        """
        dtype = parse_dtype(pick_dtype(kwargs.pop("torch_dtype", None), kwargs.pop("dtype", None)))
        cls._check_arguments(kwargs, {}, "from_pipe")
        names, configs = cls.component_names(), cls.config_names()
        values = {k: v for k, v in pipeline.components.items() if k in names}
        values.update({k: v for k, v in pipeline.config.items() if k in configs})
        values.update(kwargs)
        required = [n for n, p in cls._parameters().items() if p.default is inspect.Parameter.empty]
        missing = [n for n in required if values.get(n) is None]
        if missing:
            raise ValueError(
                f"{cls.__name__}.from_pipe needs {', '.join(missing)}, which {type(pipeline).__name__} does "
                f"not have; pass them by name ({missing[0]}=...)"
            )
        new = cls(**values)
        new._name_or_path = pipeline._name_or_path
        if dtype is not None:
            new.to(dtype)  # type: ignore[attr-defined]
        return new

    @classmethod
    def _check_arguments(
        cls, components: Mapping[str, Any], subfolders: Mapping[str, str], method: str = "from_pretrained"
    ) -> None:
        valid = ", ".join(cls.component_names())
        unknown = sorted(set(components) - set(cls._parameters()))
        if unknown:
            raise TypeError(
                f"{cls.__name__}.{method} got unexpected argument(s) {', '.join(unknown)}; "
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
        candidates = [c.__name__ for c in _subclasses(PipelineLoading) if c.diffusers_class_name == found]
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

    def save_pretrained(
        self,
        directory: str | Path,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        **hub_options: Any,
    ) -> None:
        """Write each component to its subfolder and ``model_index.json``, as diffusers does: weights as
        safetensors, sharded above ``max_shard_size``; ``push_to_hub=True`` then uploads the folder
        (``repo_id``, default the folder name; ``token``, ``private``, ``commit_message``, ``create_pr``)."""
        check_safe_serialization(safe_serialization)
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        entries: dict[str, Any] = {}
        for name, component in self.components.items():
            if component is None:
                entries[name] = [None, None]
                continue
            entries[name] = list(component_entry(component))
            save_component(component, root / name, variant, max_shard_size)
        write_model_index(root, self.diffusers_class_name or type(self).__name__, {**entries, **self._config})
        if push_to_hub:
            upload_folder(root, hub_options.pop("repo_id", root.name), **hub_options)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        **hub_options: Any,
    ) -> Any:
        """Save to a temporary folder and upload it to the Hub repo ``repo_id`` (created when missing);
        ``hub_options``: ``commit_message``, ``private``, ``token``, ``create_pr``."""
        return save_and_upload(
            lambda folder: self.save_pretrained(folder, variant=variant, max_shard_size=max_shard_size),
            repo_id,
            **hub_options,
        )


def _subclasses(cls: type[PipelineLoading]) -> Iterator[type[PipelineLoading]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)
