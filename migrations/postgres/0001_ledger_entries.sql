-- The ledger's entries (src/ledger/store.rs, docs/ledger-store.md).
-- Keyed by the customer and the stream entry id (<ms>-<seq> as two
-- integers): writing an entry twice is a no-op. `balances` and `limits` are
-- the codec's fields 6 and 7 (src/ledger/codec.rs), plan ids included.
CREATE TABLE ledger_entries (
    customer_id     TEXT    NOT NULL,
    id_ms           BIGINT  NOT NULL,
    id_seq          BIGINT  NOT NULL,
    at              BIGINT  NOT NULL,
    feature_id      TEXT,
    op              TEXT    NOT NULL,
    units           BIGINT  NOT NULL,
    idempotency_key TEXT,
    lock_id         TEXT,
    subject         TEXT,
    balances        TEXT    NOT NULL,
    limits          TEXT    NOT NULL,
    PRIMARY KEY (customer_id, id_ms, id_seq)
);
CREATE INDEX ledger_entries_customer_at ON ledger_entries (customer_id, at);
CREATE INDEX ledger_entries_customer_feature_at ON ledger_entries (customer_id, feature_id, at);
