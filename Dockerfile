# One image with every Tally binary; docker-compose.yml picks the command per service.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked \
        -p tally-command-api -p tally-query-api -p tally-projectors -p tally-cli \
    && mkdir /out \
    && cp target/release/tally target/release/tally-relay target/release/tally-command-api \
          target/release/tally-query-api target/release/tally-projector /out/

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
# An unprivileged user: nothing in Tally needs root.
USER 65532:65532
ENV TALLY_LOG_FORMAT=json
