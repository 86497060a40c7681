"""stable-cascade: Stable Cascade (Würstchen v3) text-to-image, diffusers-compatible and fast."""

__version__ = "0.1.0"
