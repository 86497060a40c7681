"""The demo cascade's settings as plain data (no torch): its size and the training recipe's sizes."""

from __future__ import annotations

import dataclasses

DEMO_SIZE = 128  # pixels; Stage C works on 3x3 latents, Stage B on 32x32
PREVIEWER_FILE = "previewer.safetensors"  # beside the prior and decoder folders
IP_ADAPTER_FILE = "ip_adapter.safetensors"  # the demo IP-Adapter, beside them too
LCM_FOLDER = "lcm"  # the LCM LoRAs beside them: lcm/prior.safetensors, lcm/decoder.safetensors


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Sizes of the demo training run (the defaults made the shipped model)."""

    images: int = 20_000
    seed: int = 0
    stage_a_steps: int = 1_500
    stage_b_steps: int = 5_000
    stage_b_refine_steps: int = 54_000  # on the final (frozen) encoders
    stage_c_steps: int = 6_000
    previewer_steps: int = 2_500
    batch_size: int = 16
    stage_c_batch_size: int = 32
    lr: float = 1e-3
    stage_a_lr: float = 1e-3
    ema_decay: float = 0.995
    pyramid_noise_max_side: int = 2  # Stage B: the default 16 is most of the noise of a 32×32 latent
    effnet_scale: float = 0.75  # Stage B: the encoder's input size / image size (3×3 latents)
    stage_c_train_text_encoder: bool = False  # True: the text encoder learns with Stage C
    image_encoder_steps: int = 1_500  # the image encoder, contrastive against Stage C's text encoder
    image_encoder_batch_size: int = 128
    image_encoder_images: int = 10_000  # the first images of the data set
    stage_c_image_steps: int = 2_000  # Stage C's image phase, after its text phase
    stage_c_image_share: float = 0.5  # of the examples given their image embedding (else zeros)
    stage_c_image_caption_dropout: float = 0.2  # captions dropped in that phase
    ip_adapter_steps: int = 1_500  # the demo IP-Adapter on the final, frozen prior, on image prompt data
    lcm_steps: int = 120  # each stage's LCM LoRA, distilled from the final stages (0: none)
    lcm_rank: int = 4
    lcm_teacher_steps: int = 16
