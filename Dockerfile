# Multi-stage build: compile in the Rust image, run as a non-root user in a
# slim Debian image with only CA certificates added.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock clippy.toml ./
COPY src ./src
COPY config ./config
COPY tests ./tests
RUN cargo build --release --locked --bin runbridge

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /app runbridge
WORKDIR /app
COPY --from=build /src/target/release/runbridge /usr/local/bin/runbridge
COPY config ./config
USER runbridge
ENV RUNBRIDGE_CONFIG_DIR=/app/config
EXPOSE 8080 8089
ENTRYPOINT ["runbridge"]
CMD ["all"]
