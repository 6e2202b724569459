__version__ = "0.1.0"


def __getattr__(name):
    # diffusers' `from_pretrained` finds custom pipeline components as attributes of the top-level package
    # (model_index.json stores ["ldm_paper", "CaptionEncoder"]); imported lazily so `import ldm_paper` stays light.
    if name == "CaptionEncoder":
        from .text import CaptionEncoder
        return CaptionEncoder
    raise AttributeError(f"module 'ldm_paper' has no attribute {name!r}")
