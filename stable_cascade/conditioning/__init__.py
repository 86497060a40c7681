"""Text and image conditioning: CLIP encoders turned into UNet inputs, shared by both pipelines."""

from stable_cascade.conditioning.image import ImageInput, check_images, encode_images
from stable_cascade.conditioning.image_files import MAX_IMAGE_PIXELS, open_image
from stable_cascade.conditioning.text import PromptConditioning, TextEmbeddings, encode_prompts, encode_text

__all__ = [
    "MAX_IMAGE_PIXELS",
    "ImageInput",
    "PromptConditioning",
    "TextEmbeddings",
    "check_images",
    "encode_images",
    "encode_prompts",
    "encode_text",
    "open_image",
]
