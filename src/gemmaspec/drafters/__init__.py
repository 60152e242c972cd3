"""Drafters: `none`, `ngram`, `draft:PATH` (and the MTP assistant). `make_drafter` parses the --drafter value."""

from __future__ import annotations

from ..errors import GemmaspecError
from .base import Draft, DraftContext, Drafter
from .ngram import NgramDrafter

__all__ = ["Draft", "DraftContext", "Drafter", "NgramDrafter", "make_drafter", "DRAFTER_CHOICES"]

DRAFTER_CHOICES = "auto, none, ngram, mtp, mtp:PATH, draft:PATH"


def make_drafter(spec: str, target, dtype=None, device=None) -> Drafter:
    """Build the drafter named by `spec` for the loaded target (a loading.LoadedModel)."""
    spec = (spec or "auto").strip()
    if spec == "none":
        return Drafter()
    if spec == "ngram":
        return NgramDrafter()
    if spec == "auto":
        return _auto_drafter(target, dtype, device)
    if spec.startswith("draft:"):
        from ..loading import load_model
        from .draft_model import DraftModelDrafter

        path = spec[len("draft:"):]
        if not path:
            raise GemmaspecError("--drafter draft:PATH needs a path to a small Gemma model")
        loaded = load_model(path, dtype=dtype or target.model.dtype, device=device or target.model.embed_tokens.device)
        return DraftModelDrafter(loaded, target.tokenizer, name=spec)
    if spec == "mtp" or spec.startswith("mtp:"):
        from .mtp import make_mtp_drafter

        return make_mtp_drafter(spec, target)
    raise GemmaspecError(f"unknown drafter '{spec}' (choose from: {DRAFTER_CHOICES})")


def _auto_drafter(target, dtype, device) -> Drafter:
    """The best drafter this model has: its paired MTP assistant (with prompt lookup for long matches) when one
    exists, else prompt lookup."""
    from .mtp import find_paired_assistant, make_mtp_drafter

    if find_paired_assistant(target) is not None:
        from .hybrid import HybridDrafter

        return HybridDrafter(make_mtp_drafter("mtp", target))
    return NgramDrafter()
