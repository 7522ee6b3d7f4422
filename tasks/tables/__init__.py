"""Tables (CSV, Parquet) ingested out of core: Dask tasks stream blocks of rows, and no
process ever holds the whole table.

Two passes over blocks of about `data.block_mb` each:
1. **scan and profile**: parse each block once (CSV: a byte range, or chunks of a
   compressed stream; Parquet: batches of a row group) and count, per column, the values
   present and the values that are numbers; then, in the same task, type the block's
   columns by its own counts, clean it, hash each good row to its split and sum what the
   checks and the encoder need: rows per split, label counts, category counts and a
   hash-ranked sample of the training rows' numbers (their median fills missing values).
   The cleaned rows and their hashes are kept as the block's scratch Arrow file. The driver
   then types every column for the whole table (`decide_schema`), so that all blocks are
   cleaned alike: a block whose own counts typed a column otherwise (rare: a column of
   numbers that is mostly text elsewhere, say) is parsed and profiled again with the
   table's types, and its first result dropped.
2. **write**: encode each cleaned block and write its rows into the split arrays at the
   offsets the profile fixed.

Rows are numbered within a block until every block is counted; the table's row numbers
(in messages, the quarantine file, the test rows) add the block's first row.

Every decision depends on row contents only, never on block boundaries: changing
`data.block_mb` or re-partitioning the source changes nothing in the output. Limits: a
quoted CSV field may not contain a line break (byte ranges split at line ends), and a
compressed CSV is read by one task as a stream (still in bounded memory).

The package, by job: `blocks` (parse the source into blocks, scratch files), `schema` (type
every column from the blocks' counts), `cleaning` (typed rows, bad rows, each row's split),
`profiling` (a block's profile, the table's, and the plan it fixes), `writing` (the write
pass and the whole table).
"""

from tasks.tables.blocks import profile_raw
from tasks.tables.cleaning import clean_block
from tasks.tables.schema import Schema, decide_schema
from tasks.tables.writing import ingest_table, survey

__all__ = ["Schema", "clean_block", "decide_schema", "ingest_table", "profile_raw", "survey"]
