"""loraplex: a multi-adapter LoRA inference server with built-in fine-tuning."""

__version__ = "0.1.0"
