"""The demo model: a tiny Llama trained offline on CPython's own documentation, then cached."""

from server.demo.build import build_demo_model, default_demo_dir, ensure_demo_model, is_complete
from server.demo.train import DemoSize

__all__ = ["DemoSize", "build_demo_model", "default_demo_dir", "ensure_demo_model", "is_complete"]
