# syntax=docker/dockerfile:1
# rowcast in a container: `docker build -t rowcast .`, then `docker run rowcast serve ...`.
# The mapping (config/mapping.toml) and the migrations are compiled into the binary.

# Build and runtime stages share one Debian release, so the binary finds the glibc it was
# linked against.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and compiled dependencies between builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked && cp target/release/rowcast /usr/local/bin/rowcast

FROM debian:bookworm-slim
RUN useradd --system --no-create-home --uid 10001 rowcast
COPY --from=build /usr/local/bin/rowcast /usr/local/bin/rowcast
USER rowcast
EXPOSE 8080
ENTRYPOINT ["rowcast"]
CMD ["--help"]
