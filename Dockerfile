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
ENV DB_FILE=/app/data/automation_runner.db \
    LOG_DIR=/app/logs
VOLUME ["/app/data", "/app/logs"]
USER omniflow
# SIGTERM (docker stop) stops firing schedules and lets runs in flight finish.
STOPSIGNAL SIGTERM
CMD ["omniflow", "daemon"]
