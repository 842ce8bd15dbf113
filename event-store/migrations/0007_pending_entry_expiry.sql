-- Finds pending journal entries whose deadline has passed, for the expiry worker, without
-- scanning the log (as 0004 does for transfers). `expires_at` is RFC 3339 UTC text in the
-- payload (schemas/events/EntryPending.v1.json); the domain re-checks the exact instant.
CREATE INDEX events_pending_entry_expiry ON events ((payload ->> 'expires_at'))
    WHERE event_type = 'EntryPending';
