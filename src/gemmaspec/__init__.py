"""gemmaspec: speculative decoding for Gemma models, lossless by construction."""

__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import gemmaspec` stays cheap for the CLI's --help
    if name in ("Engine", "GenerationResult"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(name)
