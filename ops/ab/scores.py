"""Image scores for `promptcache ab`: BRISQUE (no-reference quality, lower is better) and, when a
CLIP model is on disk, prompt-image similarity (100 x cosine, higher is better).

Nothing is downloaded. BRISQUE's SVM and normalisation parameters are files inside the `brisque`
package (`brisque/models/svm.txt`, `normalize.pickle`), read with `url=False`; CLIP is loaded
with `local_files_only=True` from a path or the local Hugging Face cache, or not at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import structlog
from brisque.models import MODEL_PATH
from PIL import Image

from promptcache.quality import load_brisque

log = structlog.get_logger(__name__)

# Tried from the local Hugging Face cache when no --clip-model is given (never downloaded).
CLIP_CANDIDATES = ("openai/clip-vit-base-patch32", "openai/clip-vit-base-patch16",
                   "openai/clip-vit-large-patch14")


class Scorer(Protocol):
    name: str     # key in the report
    label: str    # what the table calls it
    better: str   # "lower" or "higher"

    def score(self, image: Image.Image, prompt: str) -> float | None:
        """The image's score, None when the metric is undefined for it (e.g. a flat image)."""
        ...


class BrisqueScorer:
    name = "brisque"
    label = "BRISQUE"
    better = "lower"

    def __init__(self) -> None:
        self.model_dir = Path(MODEL_PATH)
        self._score = load_brisque()  # the quality gate's BRISQUE: one copy of its NumPy fix

    def score(self, image: Image.Image, prompt: str) -> float | None:
        return self._score(np.asarray(image.convert("RGB")))


@dataclass
class ClipScorer:
    """CLIPScore without the clamp: 100 x cosine(image embedding, prompt embedding). The prompt is
    the user's own (what was asked for), cut to CLIP's 77 tokens, for both arms."""

    source: str
    model: Any
    processor: Any
    name: str = "clip"
    label: str = "CLIP similarity"
    better: str = "higher"

    @classmethod
    def load(cls, source: str) -> ClipScorer:
        """A transformers CLIP model from a directory or the local cache; never downloads.
        Raises OSError when it is not on disk, ImportError without transformers/torch."""
        import transformers
        from transformers import CLIPModel, CLIPProcessor

        transformers.logging.set_verbosity_error()  # no torchvision notice, no progress bars
        transformers.logging.disable_progress_bar()
        model = CLIPModel.from_pretrained(source, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(source, local_files_only=True)
        model.eval()
        return cls(source=source, model=model, processor=processor)

    def score(self, image: Image.Image, prompt: str) -> float | None:
        import torch

        inputs = self.processor(text=[prompt], images=image.convert("RGB"), return_tensors="pt",
                                padding=True, truncation=True, max_length=77)
        with torch.no_grad():
            out = self.model(**inputs)
        img = torch.nn.functional.normalize(out.image_embeds, dim=-1)
        txt = torch.nn.functional.normalize(out.text_embeds, dim=-1)
        value = float(100.0 * (img * txt).sum())
        return value if math.isfinite(value) else None


def find_clip(source: str | None) -> tuple[ClipScorer | None, str | None]:
    """(scorer, None), or (None, a note saying why similarity is skipped). An explicit `source`
    that cannot be loaded is an error (OSError/ImportError), not a note."""
    if source is not None:
        return ClipScorer.load(source), None
    try:
        import transformers  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return None, ("CLIP similarity skipped: transformers and torch are not installed "
                      "(nothing is downloaded)")
    for candidate in CLIP_CANDIDATES:
        try:
            return ClipScorer.load(candidate), None
        except OSError:
            continue
    return None, ("CLIP similarity skipped: no CLIP model on disk (looked in the local Hugging "
                  f"Face cache for {', '.join(CLIP_CANDIDATES)}; nothing is downloaded). "
                  "Pass --clip-model PATH to a saved transformers CLIP model")
