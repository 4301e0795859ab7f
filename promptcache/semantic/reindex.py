"""Re-embed the shared index with the configured model (`promptcache reindex`).

Vectors carry the name of the model that made them and are never compared with another model's.
After a model change (PROMPTCACHE_EMBEDDINGS, _MODEL or _RUNTIME) the entries embedded before it
are exact-only until re-embedded: this reads each such record's canonical prompt and params
partition from the shared hash, embeds the prompt with the current model and stores it again
through the same path as a new entry (only while the registry still has the entry), so every
running worker picks it up from the log. Nothing is generated, no image is touched.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import structlog

from promptcache.semantic.store import Record
from promptcache.semantic.tier import SemanticTier

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Reembedded:
    entry_id: str
    cache_key: str
    params_key: str
    canonical: str
    vector: np.ndarray


@dataclass(slots=True)
class ReindexReport:
    seen: int = 0
    current: int = 0  # already the configured model's
    reembedded: list[Reembedded] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)  # why an entry was not re-embedded
    by_model: Counter[str] = field(default_factory=Counter)  # the models found
    seconds: float = 0.0
    deferred: int = 0  # entries stored while a model loaded, indexed now (SemanticTier.add)


def params_key_of(record: Record) -> str | None:
    """The params partition a record was stored in: its partition without 'model:dim:'."""
    prefix = f"{record.model}:{record.vector.shape[0]}:"
    partition = record.meta.partition
    return partition[len(prefix):] if partition.startswith(prefix) else None


async def reindex(tier: SemanticTier, *, concurrency: int = 32,
                  progress: Callable[[ReindexReport], None] | None = None) -> ReindexReport:
    """Re-embed every record of another model than the tier's. `progress` is called every 2
    seconds with the report so far."""
    await tier.warm()
    report = ReindexReport()
    if tier.deferred_indexing is not None:
        report.deferred = await tier.deferred_indexing
    started = time.monotonic()
    last_progress = started
    pending: set[asyncio.Task[None]] = set()

    async def one(record: Record, params_key: str) -> None:
        vector = await tier.add(entry_id=record.meta.entry_id, cache_key=record.meta.cache_key,
                                params_key=params_key, canonical=record.meta.prompt)
        if vector is None:
            report.skipped["evicted_or_not_embeddable"] += 1
            return
        report.reembedded.append(Reembedded(record.meta.entry_id, record.meta.cache_key,
                                            params_key, record.meta.prompt, vector))

    async for raw_id, raw in tier.store.redis.hscan_iter(tier.store.keys.semantic_vectors,
                                                         count=500):
        entry_id = raw_id.decode()
        report.seen += 1
        try:
            record = Record.from_json(entry_id, raw)
        except (ValueError, KeyError, TypeError):
            report.skipped["unreadable"] += 1
            continue
        report.by_model[record.model] += 1
        if record.model == tier.embedder.model:
            report.current += 1
            continue
        params_key = params_key_of(record)
        if params_key is None:
            report.skipped["unknown_partition"] += 1
            continue
        if len(pending) >= concurrency:
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        pending.add(asyncio.create_task(one(record, params_key)))
        if progress is not None and time.monotonic() - last_progress >= 2:
            last_progress = time.monotonic()
            report.seconds = last_progress - started
            progress(report)
    if pending:
        await asyncio.gather(*pending)
    report.seconds = time.monotonic() - started
    log.info("semantic_reindexed", seen=report.seen, reembedded=len(report.reembedded),
             current=report.current, skipped=dict(report.skipped), model=tier.embedder.model,
             seconds=round(report.seconds, 2))
    return report
