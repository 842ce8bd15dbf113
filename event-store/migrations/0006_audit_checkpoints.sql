-- Signed checkpoints of the log (`tally audit seal`), published here so the auditor API can
-- serve inclusion proofs against them. A convenience copy only: whoever owns this table can
-- change it, so nothing is ever verified against it. An auditor verifies the log against the
-- checkpoint history file it keeps outside the database; a checkpoint read from here proves
-- something only through its Ed25519 signature, checked with a public key held elsewhere.
--
-- Numbered 0006, not 0005: 0005 is taken by the idempotency-scoping migration on another
-- branch. sqlx applies a lower-numbered migration it has not seen yet, so either can land first.
CREATE TABLE audit_checkpoints (
    -- Events covered: the first `tree_size` events in commit order. One checkpoint per size.
    tree_size  bigint PRIMARY KEY CHECK (tree_size >= 0),
    -- The signed checkpoint as the history file holds it (schemas/checkpoints/), without the
    -- frontier. `json`, not `jsonb`: served byte for byte as it was signed and stored.
    checkpoint json   NOT NULL
);
