#!/bin/sh
# Runs once, when the official postgres image initialises an empty data directory
# (/docker-entrypoint-initdb.d). Creates the role streaming replicas connect as and lets it
# open replication connections; the image's own pg_hba.conf only admits ordinary databases.
# Used by docker-compose.yml and the Kubernetes manifests alike.
set -eu

: "${REPLICATION_USER:?set REPLICATION_USER}"
: "${REPLICATION_PASSWORD:?set REPLICATION_PASSWORD}"

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    --set user="$REPLICATION_USER" --set password="$REPLICATION_PASSWORD" <<'SQL'
CREATE ROLE :"user" WITH REPLICATION LOGIN PASSWORD :'password';
SQL

echo "host replication $REPLICATION_USER all scram-sha-256" >> "$PGDATA/pg_hba.conf"
