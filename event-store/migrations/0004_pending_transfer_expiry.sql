-- Finds pending transfers whose hold deadline has passed, for the expiry worker, without
-- scanning the log. `expires_at` is RFC 3339 UTC text in the payload (see
-- schemas/events/TransferPending.v1.json); the worker compares it as text to narrow the
-- search and the domain re-checks the exact instant before expiring anything.
CREATE INDEX events_pending_transfer_expiry ON events ((payload ->> 'expires_at'))
    WHERE event_type = 'TransferPending';
