"""Checks of model files shared by `gemmaspec doctor` and the loader.

`files` reads GGUF and safetensors headers without trusting them (every offset and size is checked against
the file size before anything is read); `contents` compares what a checkpoint holds with what its config
implies and applies the chat-template policy. The loader runs the cheap ones on every load, so `generate`,
`chat` and `serve` refuse a broken file with the same one-line message the doctor prints.
"""

from .contents import load_time_checks
from .files import check_gguf_structure

__all__ = ["check_gguf_structure", "load_time_checks"]
