# syntax=docker/dockerfile:1
# projectionist-operator: the Projectionist operator: EventStore and Projection controllers and the sidecar injection webhook.
# A static (musl) binary on distroless/static, run as the non-root user 65532.
#
#   docker build -f docker/operator.Dockerfile -t ghcr.io/projectionist/projectionist-operator:0.1.0 .

FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --target x86_64-unknown-linux-musl -p projectionist-operator \
 && cp target/x86_64-unknown-linux-musl/release/projectionist-operator /projectionist-operator

FROM gcr.io/distroless/static-debian12:nonroot
LABEL org.opencontainers.image.title="projectionist-operator" \
      org.opencontainers.image.ref.name="ghcr.io/projectionist/projectionist-operator" \
      org.opencontainers.image.source="https://github.com/projectionist/projectionist" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /projectionist-operator /usr/local/bin/projectionist-operator
USER 65532:65532
EXPOSE 8080 8443
ENTRYPOINT ["/usr/local/bin/projectionist-operator"]
