"""fastrm: LLaVA-1.5 inference with a visual relevancy map per generated token.

    import fastrm
    engine = fastrm.Engine()  # the bundled demo model and its FastRM head
    print(engine.explain(fastrm.demo_image(), "What color is the star?").text)

Every map is a float32 NumPy array of shape ``engine.grid``. ``Engine.stream`` yields the run's
events as they happen and stops the run when the iterator is dropped or closed.
"""


class FastrmError(Exception):
    """Every error the engine raises, except OSError for files it cannot read."""


class InputError(FastrmError, ValueError):
    """A bad argument or image: an unknown method, an unreadable image, a missing head."""


class ModelError(FastrmError):
    """A model folder or head file that is not what it should be."""


class EngineError(FastrmError):
    """The device or the engine failed (a CUDA error, non-finite values)."""


class OutOfMemoryError(EngineError, MemoryError):
    """The device ran out of memory."""


class CancelledError(FastrmError):
    """The run was stopped."""


class EngineBusyError(FastrmError, RuntimeError):
    """A run was started while a stream opened in the same thread still holds the engine."""


from ._fastrm import (  # noqa: E402  (the native module raises the classes above)
    Confidence,
    Done,
    Engine,
    Explanation,
    Generation,
    ImageEncoded,
    Prefilled,
    Stream,
    Timings,
    Token,
    TokenMap,
    __version__,
    demo_image,
)

__all__ = [
    "CancelledError",
    "Confidence",
    "Done",
    "Engine",
    "EngineBusyError",
    "EngineError",
    "Explanation",
    "FastrmError",
    "Generation",
    "ImageEncoded",
    "InputError",
    "ModelError",
    "OutOfMemoryError",
    "Prefilled",
    "Stream",
    "Timings",
    "Token",
    "TokenMap",
    "__version__",
    "demo_image",
]
