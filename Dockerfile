# promptcache: one image for every process (worker, janitor, web, migrate); the command picks.
#   docker build -t promptcache .
#   docker run --rm -e REDIS_URL=redis://… -e DATABASE_URL=postgresql://… promptcache worker
# compose.yaml runs the whole service. Not built on the development machines (no Docker
# engine there): see docs/deploy.md.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PROMPTCACHE_DATA_DIR=/data \
    PROMPTCACHE_MIGRATIONS_DIR=/app/migrations \
    PROMPTCACHE_WEB_HOST=0.0.0.0 \
    PROMPTCACHE_WEB_PORT=8750 \
    PROMPTCACHE_LOG_FORMAT=json

WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY promptcache ./promptcache
COPY consumers ./consumers
COPY ops ./ops
COPY migrations ./migrations
RUN pip install . \
    && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin promptcache \
    && mkdir -p /data \
    && chown promptcache:promptcache /data

USER promptcache
VOLUME ["/data"]
EXPOSE 8750

# For the web process. compose.yaml turns it off for workers and the janitor (no HTTP there).
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PROMPTCACHE_WEB_PORT', '8750'), timeout=4)"]

ENTRYPOINT ["promptcache"]
CMD ["web"]
