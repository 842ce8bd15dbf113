-- The check an autocommitted append ends with (event-store/src/autocommit.rs): the events and
-- the idempotency records of a group commit are written by one statement outside any explicit
-- transaction, which commits when it ends. When a part of it fell short, this raises, and the
-- error rolls the whole statement back:
-- - TL001: fewer records were stored than given (a key was taken); DETAIL: how many.
-- - TL002: an append's rows were not written (its predecessor hash is not in the log, so the
--   caller's state is stale); DETAIL: that stream's id.
CREATE FUNCTION tally_append_checked(streams uuid[], written uuid[], keys_given integer, keys_stored bigint)
RETURNS boolean
LANGUAGE plpgsql
AS $$
DECLARE
    lost uuid;
BEGIN
    IF keys_stored < keys_given THEN
        RAISE EXCEPTION 'an idempotency key was taken'
            USING ERRCODE = 'TL001', DETAIL = (keys_given - keys_stored)::text;
    END IF;
    IF coalesce(cardinality(written), 0) < coalesce(cardinality(streams), 0) THEN
        SELECT s INTO lost FROM unnest(streams) AS s WHERE NOT (s = ANY (written)) LIMIT 1;
        RAISE EXCEPTION 'a stream is not at the version its append expected'
            USING ERRCODE = 'TL002', DETAIL = coalesce(lost::text, '');
    END IF;
    RETURN true;
END
$$;
