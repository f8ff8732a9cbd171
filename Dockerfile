# syntax=docker/dockerfile:1
#
# tenant-operator's image: a Rust build stage, then a small Debian runtime
# that runs as a non-root user and carries the PostgreSQL client tools
# (pg_dump, pg_restore, psql) that the backup and restore jobs run.
#
#   docker build -t tenant-operator:dev .
#   docker run --rm tenant-operator:dev keys new-secret --namespace tenant-system
#
# PostgreSQL client version: Debian bookworm's postgresql-client-15. pg_dump
# dumps servers of its own major version and older, so 15 covers servers up
# to PostgreSQL 15. For a newer server, build with the PGDG client of that
# major version (add apt.postgresql.org to the runtime stage and set
# --build-arg PG_MAJOR=17).

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /src
# The whole workspace (.dockerignore leaves out target/, .tools/, .git/):
# the manifest names the test server crate and the benches, which cargo
# needs to read it.
COPY . .
# Cache mounts keep the registry and the build between image builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --profile dist --locked --bin tenant-operator \
 && install -D -m 0755 target/dist/tenant-operator /out/tenant-operator

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
ARG PG_MAJOR=15
# ca-certificates: TLS to Postgres, KMS and the API server.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates "postgresql-client-${PG_MAJOR}" \
 && rm -rf /var/lib/apt/lists/*
# A fixed non-root uid/gid (the chart's securityContext runs as 10001).
RUN groupadd --system --gid 10001 tenant-operator \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin tenant-operator
COPY --from=builder /out/tenant-operator /usr/local/bin/tenant-operator
USER 10001:10001
# glibc's malloc: two arenas (not eight per core; the 10,000-Tenant runs
# of docs/scale.md since 2026-12-03 used two), a fixed
# 256 KiB mmap threshold (glibc otherwise raises it up to 32 MiB as large
# buffers are freed, and later ones then stay in the heap) and a 512 KiB trim
# threshold. benches/scale.rs runs the operator with the same value
# (docs/scale.md, "The operator's memory").
ENV GLIBC_TUNABLES=glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=262144:glibc.malloc.trim_threshold=524288
# /metrics, /healthz, /readyz
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/tenant-operator"]
CMD ["run"]
