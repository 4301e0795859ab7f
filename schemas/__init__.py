"""Wire contracts of promptcache (CONTRACT.md). Imports only pydantic."""

from schemas.events import (
    Answer,
    CacheStatus,
    ChangeEvent,
    DeadLetter,
    ErrorInfo,
    GenerationJob,
    Options,
    Params,
    Request,
    Result,
    Status,
)

__all__ = [
    "Answer",
    "CacheStatus",
    "ChangeEvent",
    "DeadLetter",
    "ErrorInfo",
    "GenerationJob",
    "Options",
    "Params",
    "Request",
    "Result",
    "Status",
]
