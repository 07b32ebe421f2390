# Type stubs for the native module (src/python/mod.rs); the package re-exports every name.
import os
from typing import Iterator, Literal, Optional, Tuple, Union

import numpy as np
import numpy.typing as npt

__version__: str

#: What `image` arguments take: a path, encoded PNG/JPEG bytes, a NumPy uint8 array of shape
#: (height, width, 3), or a PIL image (any mode; converted to RGB).
ImageLike = Union[str, os.PathLike, bytes, bytearray, npt.NDArray[np.uint8], "PIL.Image.Image"]  # noqa: F821
Method = Literal["fastrm", "baseline", "baseline-incremental", "gradcam"]

def demo_image() -> str:
    """The bundled demo scene (a yellow star, a white circle, a red cross), as a file path."""

class Timings:
    vision_s: float
    prefill_s: float
    decode_s: float
    maps_s: float

class Generation:
    text: str
    input_ids: list[int]
    generated_ids: list[int]
    stop_reason: Literal["eos", "max_new_tokens", "context"]
    timings: Timings

class TokenMap:
    kind: Literal["map"]
    index: int
    id: int
    text: str
    #: float32, shape (rows, cols) of the engine's grid.
    map: npt.NDArray[np.float32]
    entropy: float

class Confidence:
    mean_entropy: float
    threshold: Optional[float]
    verdict: Literal["confident", "uncertain", "uncalibrated"]
    tokens: int

class Explanation:
    text: str
    input_ids: list[int]
    generated_ids: list[int]
    stop_reason: Literal["eos", "max_new_tokens", "context"]
    method: Method
    layer: Optional[int]
    grid: Tuple[int, int]
    tokens: list[TokenMap]
    confidence: Confidence
    timings: Timings

class ImageEncoded:
    kind: Literal["image_encoded"]

class Prefilled:
    kind: Literal["prefilled"]
    prompt_len: int

class Token:
    kind: Literal["token"]
    index: int
    id: int
    text_delta: str
    map: Optional[TokenMap]

class Done:
    kind: Literal["done"]
    generation: Generation
    confidence: Optional[Confidence]

Event = Union[ImageEncoded, Prefilled, Token, TokenMap, Done]

class Stream(Iterator[Event]):
    def __iter__(self) -> "Stream": ...
    def __next__(self) -> Event: ...
    def close(self) -> None: ...
    def __enter__(self) -> "Stream": ...
    def __exit__(self, *args: object) -> None: ...

class Engine:
    device: str
    model: Optional[str]
    grid: Tuple[int, int]
    has_head: bool
    def __init__(
        self,
        model: Union[None, str, os.PathLike] = None,
        device: str = "cpu",
        head: Union[None, str, os.PathLike] = None,
        dtype: Optional[Literal["f16", "bf16", "f32"]] = None,
    ) -> None: ...
    def explain(
        self,
        image: ImageLike,
        prompt: str,
        method: Method = "fastrm",
        max_new_tokens: int = 64,
        full_r: bool = False,
        layer: Optional[int] = None,
    ) -> Explanation: ...
    def generate(self, image: ImageLike, prompt: str, max_new_tokens: int = 64) -> Generation: ...
    def stream(
        self,
        image: ImageLike,
        prompt: str,
        method: Optional[Method] = "fastrm",
        max_new_tokens: int = 64,
        full_r: bool = False,
        layer: Optional[int] = None,
    ) -> Stream: ...

def _runs() -> Tuple[int, int]: ...
