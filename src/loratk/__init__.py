"""loratk: fine-tune Stable Diffusion XL into small character and style adapters."""

__version__ = "0.1.0"
