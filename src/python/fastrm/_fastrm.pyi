# Type stubs for the native module (src/python/mod.rs); the package re-exports every name.
import os
from typing import Any, Dict, Iterator, List, Literal, Optional, Tuple, TypedDict, Union

from typing_extensions import Unpack

import numpy as np
import numpy.typing as npt

__version__: str

#: What `image` arguments take: a path, encoded PNG/JPEG bytes, a NumPy uint8 array of shape
#: (height, width, 3), or a PIL image (any mode; converted to RGB).
ImageLike = Union[str, os.PathLike, bytes, bytearray, npt.NDArray[np.uint8], "PIL.Image.Image"]  # noqa: F821
# One image, several (a question gets one <image> per image before it, in order; a conversation
# places them at its {"type": "image"} parts, in order), or None (text only: answered, no maps).
Images = Union[None, ImageLike, List[ImageLike], Tuple[ImageLike, ...]]
# A question, or a conversation: OpenAI-style messages ({"role": "system" | "user" | "assistant",
# "content": str | [{"type": "text", "text": ...} | {"type": "image"}]}), where each
# {"type": "image"} part marks the place of the next of the `image` argument's images.
Prompt = Union[str, List[Dict[str, Any]]]
Method = Literal["fastrm", "baseline", "baseline-incremental", "gradcam"]
StopReason = Literal["eos", "max_new_tokens", "context", "stop"]
#: A token's log-probability and its most likely alternatives, (id, token, logprob) each.
LogprobRow = Tuple[float, list[Tuple[int, str, float]]]

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
    stop_reason: StopReason
    timings: Timings
    #: With logprobs=N: one row per generated token.
    logprobs: list[LogprobRow]

class TokenMap:
    kind: Literal["map"]
    index: int
    id: int
    text: str
    #: float32, shape (rows, cols) of the engine's grid; (images, rows, cols) for a prompt of
    #: several images; flat (one value per image token) for a tiled image (LLaVA-NeXT).
    map: npt.NDArray[np.float32]
    #: Each image's map placed on its picture, float32 (rows, cols): the patch grid of a square
    #: view, the kept tiles' grid over the whole picture for a tiled image.
    placed: List[npt.NDArray[np.float32]]
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
    stop_reason: StopReason
    method: Method
    layer: Optional[int]
    grid: Tuple[int, int]
    tokens: list[TokenMap]
    confidence: Confidence
    timings: Timings
    logprobs: list[LogprobRow]

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
    logprobs: Optional[LogprobRow]

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

class Sampling(TypedDict, total=False):
    """The keyword arguments that choose tokens (greedy without them); as the CLI's flags."""

    temperature: float
    top_p: float
    top_k: int
    seed: int
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    #: Report each token's log-probability and this many alternatives (0 to 20).
    logprobs: int
    #: End the answer where one of these first appears in its text (left out).
    stop: Union[str, list[str]]
    stop_ids: list[int]

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
        image: Images,
        prompt: Prompt,
        method: Method = "fastrm",
        max_new_tokens: int = 64,
        full_r: bool = False,
        layer: Optional[int] = None,
        **sampling: Unpack[Sampling],
    ) -> Explanation: ...
    def generate(
        self,
        image: Images,
        prompt: Prompt,
        max_new_tokens: int = 64,
        **sampling: Unpack[Sampling],
    ) -> Generation: ...
    def stream(
        self,
        image: Images,
        prompt: Prompt,
        method: Optional[Method] = "fastrm",
        max_new_tokens: int = 64,
        full_r: bool = False,
        layer: Optional[int] = None,
        **sampling: Unpack[Sampling],
    ) -> Stream: ...

def _runs() -> Tuple[int, int]: ...
