# One image with every Tally binary: tally (migrate, audit, load), tally-relay,
# tally-command-api, tally-query-api, tally-projector, tally-console. It has no default command: each service
# of docker-compose.yml and each workload of deploy/k8s names its binary.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked \
        -p tally-command-api -p tally-query-api -p tally-projectors -p tally-cli -p tally-console \
    && mkdir /out \
    && cp target/release/tally target/release/tally-relay target/release/tally-command-api \
          target/release/tally-query-api target/release/tally-projector target/release/tally-console /out/

FROM debian:bookworm-slim
# curl: the compose healthchecks ask /health and /ready from inside the container.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
# The sealer's history folder (a volume in docker-compose.yml): a new volume takes its owner
# from here, so the unprivileged user can write it.
RUN mkdir -p /var/lib/tally-sealer && chown 65532:65532 /var/lib/tally-sealer
# An unprivileged user: nothing in Tally needs root, and only the sealer writes to the
# filesystem (its history, on a volume).
USER 65532:65532
ENV TALLY_LOG_FORMAT=json
# Command API, query API (and their operations listeners), projector (/health, /ready,
# /metrics), console, sealer.
EXPOSE 8080 8081 9090 8083 9180 9181 9093
