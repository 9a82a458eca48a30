# Multi-stage build: compile in the Rust image, run as a non-root user in a
# slim Debian image with only CA certificates added.
FROM rust:1-bookworm AS build
WORKDIR /src
# The workspace's manifests must all be present for Cargo to load it; only
# runbridge (and the emulator library it links) is compiled. `config/` is
# read at compile time (the development secrets runbridge must recognise).
COPY Cargo.toml Cargo.lock clippy.toml ./
COPY src ./src
COPY crates ./crates
COPY config ./config
RUN cargo build --release --locked -p runbridge --bin runbridge

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /app runbridge
WORKDIR /app
COPY --from=build /src/target/release/runbridge /usr/local/bin/runbridge
# Not config/local.toml: its development secrets are public, and the image
# runs in production mode, which refuses to start without secrets of its
# own (RUNBRIDGE__AUTH__CALLBACK_SECRETS, RUNBRIDGE__AUTH__OPERATOR_TOKENS,
# DATABRICKS_TOKEN...). docker-compose.yml mounts local.toml for development.
COPY config/default.toml config/production.toml ./config/
USER runbridge
ENV RUNBRIDGE_CONFIG_DIR=/app/config RUNBRIDGE_ENV=production
EXPOSE 8080 8089
ENTRYPOINT ["runbridge"]
CMD ["all"]
