# syntax=docker/dockerfile:1
# OmniFlow: a multi-stage build. The builder compiles the release binary; the runtime image is
# Debian slim with CA certificates, the binary and the bundled blueprints, running as a
# non-root user. Default command: `omniflow daemon` (schedules and the pool, logs on stderr
# and in /app/logs). `docker run --env-file .env IMAGE omniflow run --all-active` runs once.

FROM rust:1-slim-bookworm AS builder
WORKDIR /src
# Manifests first: the dependency layer is rebuilt only when they change.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked && strip target/release/omniflow

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --create-home --home-dir /app omniflow
WORKDIR /app
COPY --from=builder /src/target/release/omniflow /usr/local/bin/omniflow
COPY --chown=omniflow:omniflow blueprints ./blueprints
RUN mkdir -p /app/data /app/logs && chown omniflow:omniflow /app/data /app/logs
# /metrics, /healthz and /readyz on every interface of the container (written out, as a
# non-loopback listener must be), so Prometheus in another container can scrape it. Publish
# the port on the host's loopback only (`-p 127.0.0.1:9464:9464`), or set
# OMNIFLOW_METRICS_TOKEN.
ENV DB_FILE=/app/data/automation_runner.db \
    LOG_DIR=/app/logs \
    OMNIFLOW_LISTEN=0.0.0.0:9464
EXPOSE 9464
VOLUME ["/app/data", "/app/logs"]
USER omniflow
# SIGTERM (docker stop) stops firing schedules and lets runs in flight finish.
STOPSIGNAL SIGTERM
# The image has no curl: `omniflow health` asks /healthz on OMNIFLOW_LISTEN (exit 0 on 200).
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
    CMD ["omniflow", "health", "--timeout", "5"]
CMD ["omniflow", "daemon"]
