# dbkeeper in a container: non-root, the data directory a volume, a graceful stop.
#   docker build -t dbkeeper .
#   docker run -v dbkeeper-data:/data -e TELEGRAM_BOT_TOKEN=... dbkeeper
# /data holds config.toml (optional), the SQLite database and the backups.
FROM python:3.11-slim

# pg_dump/pg_restore for PostgreSQL backups (of at least the server's major version).
RUN apt-get update \
    && apt-get install -y --no-install-recommends postgresql-client \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY bot ./bot
COPY plugins ./plugins
COPY migrations ./migrations
RUN pip install --no-cache-dir . && rm -rf /src

RUN useradd --system --uid 10001 --user-group --home-dir /data --no-create-home dbkeeper \
    && mkdir -p /data && chown dbkeeper:dbkeeper /data && chmod 0750 /data
USER dbkeeper
WORKDIR /data
VOLUME ["/data"]
ENV PYTHONUNBUFFERED=1

# The health server: /livez and /readyz for probes; /health, /api/* and /metrics need
# [health] http_token (DBKEEPER_HTTP_TOKEN) when bound beyond loopback, as here.
ENV DBKEEPER_HTTP_HOST=0.0.0.0
EXPOSE 3001

# SIGTERM starts the graceful shutdown: 9 s ([shutdown] timeout_seconds), final backup
# included, under docker stop's default 10 s; give it more with `docker stop --time 20`.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3001/livez', timeout=4)"]

ENTRYPOINT ["dbkeeper"]
# From /data: its config.toml when there is one, the built-in defaults and the environment
# (TELEGRAM_BOT_TOKEN, DATABASE_URL, DBKEEPER_HTTP_*) otherwise.
CMD ["run"]
