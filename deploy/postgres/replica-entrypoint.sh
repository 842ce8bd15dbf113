#!/bin/sh
# Entrypoint of a streaming replica on the official postgres image.
#
# On the first start (empty data directory) it clones the primary with pg_basebackup, which
# also writes standby.signal and primary_conninfo (-R). Each replica streams through its own
# physical replication slot, created here if missing, so the primary keeps the WAL a replica
# has not received yet (bounded on the primary by max_slot_wal_keep_size). Later starts reuse
# the data directory. Then it hands over to the image's entrypoint, which skips initdb because
# the directory is populated and runs postgres as the postgres user.
# Used by docker-compose.yml and the Kubernetes manifests alike.
set -eu

: "${PRIMARY_HOST:?set PRIMARY_HOST}"
: "${REPLICATION_USER:?set REPLICATION_USER}"
: "${REPLICATION_PASSWORD:?set REPLICATION_PASSWORD}"
PRIMARY_PORT="${PRIMARY_PORT:-5432}"
# Slot names allow [a-z0-9_]: derive one from the host name (replica-0 -> replica_0).
SLOT="${REPLICATION_SLOT:-$(hostname | tr 'A-Z' 'a-z' | tr -c 'a-z0-9_\n' '_')}"
export PGPASSWORD="$REPLICATION_PASSWORD"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    until pg_isready --quiet --host "$PRIMARY_HOST" --port "$PRIMARY_PORT"; do
        echo "waiting for the primary at $PRIMARY_HOST:$PRIMARY_PORT"
        sleep 1
    done
    gosu postgres pg_receivewal --host "$PRIMARY_HOST" --port "$PRIMARY_PORT" \
        --username "$REPLICATION_USER" --slot "$SLOT" --create-slot --if-not-exists --no-password
    mkdir -p "$PGDATA"
    chown postgres:postgres "$PGDATA"
    chmod 0700 "$PGDATA"
    # A half-finished clone (crash mid-copy) is retried from scratch on the next start.
    if ! gosu postgres pg_basebackup --host "$PRIMARY_HOST" --port "$PRIMARY_PORT" \
        --username "$REPLICATION_USER" --pgdata "$PGDATA" --slot "$SLOT" \
        --wal-method stream --write-recovery-conf --checkpoint fast --no-password; then
        find "$PGDATA" -mindepth 1 -delete
        exit 1
    fi
fi
unset PGPASSWORD

exec docker-entrypoint.sh postgres -c hot_standby=on -c hot_standby_feedback=on "$@"
