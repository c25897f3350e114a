-- bl_messages: one row per envelope that crossed a recorded JetStream stream.
--
-- Written only by the recorder (services/recorder), which inserts a batch and then acks it.
--
-- Row identity: `id` is the envelope id (a UUIDv7); a message that is not a valid envelope
-- gets kind 'raw' and id = ids.derived_id(stream, stream_seq), so processing it again gives
-- the same id. The recorder de-duplicates: an insert token per batch, and a check for ids
-- already stored before it writes redelivered messages. A republished envelope (a new
-- stream message, delivered once) can still add a second physical row until a merge.
-- ReplacingMergeTree collapses it because its sorting key (ts, id) is the same. Correct
-- counts, whatever the merge state:
--     SELECT count() FROM bl_messages FINAL ...        -- collapses at read time
--     SELECT uniqExact(id) FROM bl_messages ...         -- distinct envelopes
--
-- A raw row and an envelope can share an id, deliberately: a plain `{"prompt": ...}` task on
-- bl.task.* is recorded raw (derived_id(stream, seq)), and the agent's intake turns it into a
-- task envelope with the same derived id and the stream's timestamp. The version column
-- `is_envelope` makes FINAL keep the envelope, and the recorder prefers the envelope too.
--
-- Sorting key (ts, id): the common reads are time ranges ("errors in the last hour", "count
-- by kind per minute"): every dashboard panel (dashboards/*.json) filters $__timeFilter(ts),
-- and `beamline logs --since` a time too. They prune on the primary index. With (agent, ts),
-- a pure time-range read scans every agent's ts range. ts then id also keeps rows of one
-- conversation or trace close together, in a narrow ts range: `beamline trace ID`
-- (beamline.reads.TRACE_SQL) takes that range from bl_messages_id_ts (003) and reads only
-- the granules inside it. The bloom-filter skip indexes on trace_id / conversation_id / id
-- then drop the other granules of a long range, and serve ad-hoc "these ids" queries
-- (BASELINES: 38.6 ms -> 18.5 ms for a trace among 5M rows). Alone they cannot make one id
-- of any of the three kinds fast: an OR of the three keeps every granule any index might
-- hold, and FINAL widens those to whole primary-key ranges.
--
-- Partition by month: few parts, and whole months can be dropped by hand (ALTER TABLE ...
-- DROP PARTITION). The same envelope always has the same ts, so its copies land in the same
-- partition and the same sorting key, where ReplacingMergeTree can collapse them.
--
-- Retention is a TTL on ts that every migration sets (ALTER TABLE ... MODIFY TTL, in
-- beamline.storage.set_retention) from BEAMLINE_RETENTION_BL_MESSAGES_DAYS, default 90 days,
-- 0 for none: a setting, not this file, so that it can change on a table that exists. Rows
-- expire as parts merge, row by row (a monthly part holds rows of many days).
--
-- non_replicated_deduplication_window: insert de-duplication on a non-replicated table.
-- With it, an insert carrying an `insert_deduplication_token` already seen among the last
-- 1000 blocks adds 0 rows. The recorder's retry of a batch that was stored, but not acked,
-- does exactly that.
CREATE TABLE IF NOT EXISTS bl_messages
(
    id              String,
    kind            LowCardinality(String),
    subject         String,
    sender          String,
    recipient       String,
    conversation_id String,
    step            UInt32,
    trace_id        String,
    span_id         String,
    parent_span_id  String,
    ts              DateTime64(6, 'UTC'),
    input_tokens    UInt32,
    output_tokens   UInt32,
    reason          LowCardinality(String),
    payload         String CODEC(ZSTD(3)),
    stream          LowCardinality(String),
    stream_seq      UInt64,
    recorded_at     DateTime64(6, 'UTC') DEFAULT now64(6),
    is_envelope     UInt8 MATERIALIZED kind != 'raw',
    INDEX idx_trace_id trace_id TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_conversation_id conversation_id TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_id id TYPE bloom_filter(0.01) GRANULARITY 1
)
ENGINE = ReplacingMergeTree(is_envelope)
PARTITION BY toYYYYMM(ts)
ORDER BY (ts, id)
SETTINGS non_replicated_deduplication_window = 1000;
