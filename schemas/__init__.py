"""Wire contracts of promptcache (CONTRACT.md). Imports only pydantic."""

from schemas.events import (
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
