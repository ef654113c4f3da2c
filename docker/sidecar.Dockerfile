# syntax=docker/dockerfile:1
# projectionist-sidecar: the Projectionist sidecar: applies a projection's events to the service's database, exactly once.
# A static (musl) binary on distroless/static, run as the non-root user 65532.
#
#   docker build -f docker/sidecar.Dockerfile -t ghcr.io/projectionist/projectionist-sidecar:0.1.0 .

FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --target x86_64-unknown-linux-musl -p projectionist-sidecar \
 && cp target/x86_64-unknown-linux-musl/release/projectionist-sidecar /projectionist-sidecar

FROM gcr.io/distroless/static-debian12:nonroot
LABEL org.opencontainers.image.title="projectionist-sidecar" \
      org.opencontainers.image.ref.name="ghcr.io/projectionist/projectionist-sidecar" \
      org.opencontainers.image.source="https://github.com/projectionist/projectionist" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /projectionist-sidecar /usr/local/bin/projectionist-sidecar
USER 65532:65532
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/projectionist-sidecar"]
