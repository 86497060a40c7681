"""Text and image conditioning: CLIP encoders turned into UNet inputs, shared by both pipelines."""

from stable_cascade.conditioning.image import (
    ImageInput,
    ImagePrompt,
    check_images,
    encode_image_prompts,
    encode_images,
    image_prompts,
)
from stable_cascade.conditioning.image_files import MAX_IMAGE_PIXELS, open_image
from stable_cascade.conditioning.text import PromptConditioning, TextEmbeddings, encode_prompts, encode_text

__all__ = [
    "MAX_IMAGE_PIXELS",
    "ImageInput",
    "ImagePrompt",
    "PromptConditioning",
    "TextEmbeddings",
    "check_images",
    "encode_image_prompts",
    "encode_images",
    "encode_prompts",
    "encode_text",
    "image_prompts",
    "open_image",
]
