"""structlog setup: one JSON line per event for machines, one readable line per event for people.

`fmt="auto"` (the default of `PROMPTCACHE_LOG_FORMAT`) picks the console renderer when stderr is
a terminal and JSON otherwise. With the console renderer, third-party progress bars and warnings
(transformers' "Loading weights", tqdm, the warnings module) are kept out of the terminal:
`quiet_third_party` is also what `promptcache up` applies to the processes it starts.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import structlog

# read by huggingface_hub / transformers / tqdm when they are imported (after this runs)
QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
# and for the processes `up` starts, which show no progress bar of their own
CHILD_QUIET_ENV = {**QUIET_ENV, "TQDM_DISABLE": "1"}
_NOISY_LOGGERS = ("transformers", "sentence_transformers", "huggingface_hub", "torch", "onnx",
                  "onnxruntime", "filelock", "urllib3", "httpx")


class _CurrentStderr:
    """Writes to whatever `sys.stderr` is at the time of writing (not at configure time: a
    captured stream that was replaced and closed must not break every later log line)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def resolve_format(fmt: str) -> str:
    """`auto` -> `console` when stderr is a terminal, else `json`."""
    if fmt == "auto":
        return "console" if sys.stderr.isatty() else "json"
    return fmt


def quiet_third_party() -> None:
    """No third-party progress bars, advisory warnings or library log lines below ERROR in
    this process (and the processes it starts, through the environment)."""
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore")
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if "transformers" in sys.modules:  # imported already: its settings were read
        try:
            import transformers

            transformers.logging.set_verbosity_error()
            transformers.logging.disable_progress_bar()
        except (ImportError, AttributeError):
            pass


def configure(level: str = "INFO", fmt: str = "auto") -> str:
    """Set up structlog for this process; returns the format in use (`json` or `console`)."""
    fmt = resolve_format(fmt)
    renderer: structlog.typing.Processor
    if fmt == "console":
        quiet_third_party()
        # one line per event: the time, the level, the event, its fields
        renderer = structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback)
        timestamper = structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False)
    else:
        renderer = structlog.processors.JSONRenderer()
        timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        timestamper,
    ]
    if fmt != "console":
        processors.append(structlog.processors.dict_tracebacks)
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    return fmt
