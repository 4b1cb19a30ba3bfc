# syntax=docker/dockerfile:1

# ---- builder ---------------------------------------------------------------
FROM rust:1.95-bookworm AS builder
WORKDIR /src

# Dependency cache layer: build every dependency against placeholder sources, so that
# editing src/ does not recompile the whole dependency graph.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --bin aliyun-sms-worker \
    && rm -rf src \
    && rm -rf target/release/.fingerprint/aliyun-sms-worker-* \
              target/release/deps/aliyun_sms_worker-* \
              target/release/deps/libaliyun_sms_worker-* \
              target/release/aliyun-sms-worker*

# The real sources (src, migrations, tests, ...), filtered by .dockerignore.
COPY . .

# The build never needs a database: queries are plain static SQL checked by the test suite,
# and this makes any future checked macro fail loudly instead of reaching for DATABASE_URL.
ENV SQLX_OFFLINE=true
RUN cargo build --release --locked --bin aliyun-sms-worker

# ---- tests -----------------------------------------------------------------
# What the compose `tests` service runs `cargo test` in: Rust plus what the test suite drives
# besides Rust — headless Chromium for the status page, pika and amqplib for the README's
# Python and Node examples, promtool for the metrics — and the test build itself, so that a
# run starts testing at once. Not based on the builder: that copies the sources first, and
# every source change would install all of this again. Layers from the least to the most
# often changed: tools, Node packages, dependencies, sources.
FROM rust:1.95-bookworm AS tests
RUN apt-get update \
    && apt-get install -y --no-install-recommends chromium python3 python3-pika nodejs npm prometheus \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
ENV SQLX_OFFLINE=true

COPY examples/node/package.json examples/node/package-lock.json examples/node/
RUN cd examples/node && npm ci --no-audit --no-fund

# Dependency cache layer, as in the builder but for the test profile with the
# dev-dependencies: built against placeholder sources, it stays cached until Cargo.toml or
# Cargo.lock changes. The crate's own artifacts go, so the real sources are built below.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo test --locked --no-run \
    && rm -rf src \
    && rm -rf target/debug/.fingerprint/aliyun-sms-worker-* \
              target/debug/deps/aliyun_sms_worker-* \
              target/debug/deps/libaliyun_sms_worker-* \
              target/debug/incremental/aliyun_sms_worker-* \
              target/debug/aliyun-sms-worker*

# The real sources, then the real test build: `cargo test` in the container only runs it.
COPY . .
RUN cargo test --locked --no-run

# ---- runtime ---------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

LABEL org.opencontainers.image.title="aliyun-sms-worker" \
      org.opencontainers.image.description="RabbitMQ job worker that sends and checks SMS verification codes through Alibaba Cloud (Dypnsapi/Dysmsapi), recording every job in Postgres"

RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 worker \
    && useradd --system --uid 10001 --gid worker --no-create-home \
               --home-dir /nonexistent --shell /usr/sbin/nologin worker

# SQL migrations are embedded in the binary; nothing else is needed at runtime.
COPY --from=builder /src/target/release/aliyun-sms-worker /usr/local/bin/aliyun-sms-worker

USER 10001
ENTRYPOINT ["aliyun-sms-worker"]
CMD ["run"]
