# Multi-stage build: epp compiled on Debian (glibc), run on distroless as non-root (uid 65532).
# Base images are pinned by digest (the tags' digests when this was written; to refresh:
# `docker buildx imagetools inspect <tag>`). The chart runs `/epp` with its args and mounts
# the plugin config at /config.
FROM rust:1.95-bookworm@sha256:6258907abe69656e41cd992e0b705cdcfabcbbe3db374f92ed2d47121282d4a1 AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY config ./config
RUN cargo build --release --locked --bin epp && strip target/release/epp

FROM gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f
COPY --from=build /src/target/release/epp /epp
COPY config/default-plugins.yaml /config/default-plugins.yaml
USER nonroot:nonroot
EXPOSE 9002 9003 9090
ENTRYPOINT ["/epp"]
