-- bl_messages_id_ts: the time range of every conversation id, trace id and envelope id in
-- bl_messages, so that one lookup (`beamline trace ID`, beamline.reads.TRACE_SQL) reads
-- bl_messages only inside that range. The same idea as the exporter's
-- otel_traces_trace_id_ts (002), for the three ids a message can be found by.
--
-- Why: bl_messages is sorted by (ts, id) for the time-range reads (see 001). A lookup by id
-- alone has no time, so it prunes with the bloom-filter skip indexes only, and `conversation
-- = x OR trace = x OR id = x` has to read all three indexes over the whole table, keep every
-- granule any of them might hold (about 3% at 1% false positives each), then widen that to
-- whole primary-key ranges for FINAL: 110 ms p95 for one trace among 10M messages. With the
-- range from this table the primary index on ts picks the one or two granules the trace is
-- in, and FINAL works on those alone (bench/trace_lookup.py measures both).
--
-- Filled only by the materialized view below, on every insert into bl_messages (the
-- recorder's batches, and anything else that inserts), and once from the rows already there
-- when this file is applied. Rows per insert block, not per id: read it with min(first_ts) /
-- max(last_ts) ... WHERE key = x, which no duplicate row can change. That makes the backfill
-- below safe to run twice (a crash before this file is recorded re-runs it), and a message
-- inserted while it runs safe to count twice. AggregatingMergeTree only folds a key's rows
-- into one as parts merge, to keep the table small.
--
-- Envelope ids are keys too, one row each: without them, finding one envelope by id needs
-- the id bloom filter over the whole table again, and the lookup does not know which of the
-- three kinds of id it was given. The price (bench, 10M messages, chDB): 14.5 bytes per
-- message compressed, a third of bl_messages there (small payloads), and on insert the
-- view's own part: a 2000-row recorder batch took 31 ms instead of 22.5 ms.
--
-- Retention is a TTL on last_ts with the days of bl_messages (beamline.storage.set_retention,
-- BEAMLINE_RETENTION_BL_MESSAGES_DAYS): a key's row goes only after the newest message it
-- covers could have gone. Monthly partitions as bl_messages: a lookup reads one granule per
-- partition (four at the default 90 days), and a TTL merge rewrites one month, not all.
CREATE TABLE IF NOT EXISTS bl_messages_id_ts
(
    key      String CODEC(ZSTD(1)),
    first_ts SimpleAggregateFunction(min, DateTime64(6, 'UTC')) CODEC(ZSTD(1)),
    last_ts  SimpleAggregateFunction(max, DateTime64(6, 'UTC')) CODEC(ZSTD(1))
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(first_ts)
ORDER BY key;

CREATE MATERIALIZED VIEW IF NOT EXISTS bl_messages_id_ts_mv
TO bl_messages_id_ts
AS SELECT
    key,
    min(ts) AS first_ts,
    max(ts) AS last_ts
FROM bl_messages
ARRAY JOIN [conversation_id, trace_id, id] AS key
WHERE key != ''
GROUP BY key;

-- The messages stored before this file was applied (none in a new database). After the view
-- exists, so that no insert falls between the two. Envelope ids are one row per message
-- already; aggregating only conversations and traces keeps the hash table to their number.
-- It reads all of bl_messages once: 5.5 s for 10M messages in the bench's chDB.
INSERT INTO bl_messages_id_ts (key, first_ts, last_ts)
SELECT key, min(ts), max(ts)
FROM bl_messages
ARRAY JOIN [conversation_id, trace_id] AS key
WHERE key != ''
GROUP BY key
UNION ALL
SELECT id, ts, ts
FROM bl_messages
WHERE id != '';
