"""The one cascade run: Stage C → Stage B → Stage A, as every caller runs it.

The combined pipeline, the engine (every job, and batch runs' batched calls through it) and training
samples call :func:`run_cascade`: the prior pipeline samples Stage C and hands on its latents and text
embeddings (Stage B takes the prior's embeddings: both stages use the same CLIP text model, as in
diffusers' combined pipeline), the decoder pipeline samples Stage B and decodes with Stage A, and an
inpainting control keeps the input outside its mask. Previews, step callbacks and cancellation ride
on the stage arguments' ``callback_on_step_end``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from stable_cascade.pipelines.control import ControlRequest, paste_unmasked
from stable_cascade.pipelines.decoder import StableCascadeDecoderPipeline
from stable_cascade.pipelines.outputs import (
    ImagePipelineOutput,
    Images,
    StableCascadePriorPipelineOutput,
    postprocess,
)
from stable_cascade.pipelines.prior import StableCascadePriorPipeline


def run_cascade(
    prior_pipe: StableCascadePriorPipeline,
    decoder_pipe: StableCascadeDecoderPipeline,
    prior: Mapping[str, Any],
    decoder: Mapping[str, Any],
    *,
    height: int,
    width: int,
    output_type: str = "pil",
    paste: ControlRequest | None = None,
    return_dict: bool = True,
) -> ImagePipelineOutput | tuple[Images]:
    """Images of exactly ``height`` × ``width``: the prior called with ``prior``'s arguments, the decoder
    with ``decoder``'s (both pipelines' own keyword arguments, without the size and the handed-on
    tensors). ``paste``: an inpainting control whose unmasked pixels the result keeps."""
    prior_out = prior_pipe(**prior, height=height, width=width, output_type="pt")
    assert isinstance(prior_out, StableCascadePriorPipelineOutput)
    paste = paste if paste is not None and paste.mask is not None and output_type != "latent" else None
    decoded = decoder_pipe(
        **prior_out.decoder_arguments(),
        **decoder,
        height=height,
        width=width,
        output_type="pt" if paste is not None else output_type,
        return_dict=return_dict or paste is not None,
    )
    if paste is None:
        return decoded  # type: ignore[return-value]  # what the decoder pipeline returns
    assert isinstance(decoded, ImagePipelineOutput) and isinstance(decoded.images, Tensor)
    pasted = postprocess(paste_unmasked(decoded.images, paste, height, width), output_type)
    return ImagePipelineOutput(pasted) if return_dict else (pasted,)
