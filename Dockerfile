# Multi-stage build of a static-ish epp: a glibc build on Debian, run on distroless as non-root.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY config ./config
RUN cargo build --release --locked --bin epp && strip target/release/epp

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/epp /epp
COPY config/default-plugins.yaml /config/default-plugins.yaml
USER nonroot:nonroot
EXPOSE 9002 9003 9090
ENTRYPOINT ["/epp"]
