"""Tables (CSV, Parquet) ingested out of core: Dask tasks stream blocks of rows, and no
process ever holds the whole table.

Three passes over blocks of about `data.block_mb` each:
1. **scan**: parse each block once (CSV: a byte range, or chunks of a compressed stream;
   Parquet: batches of a row group), keep it as a scratch Arrow file and count, per column,
   the values present and the values that are numbers. The driver then types every column
   for the whole table (`decide_schema`), so all blocks are cleaned alike.
2. **profile**: clean each block, hash each good row to its split and sum what the checks
   and the encoder need: rows per split, label counts, category counts and a hash-ranked
   sample of the training rows' numbers (their median fills missing values). The cleaned
   rows and their hashes replace the block's scratch file.
3. **write**: encode each cleaned block and write its rows into the split arrays at the
   offsets the profile pass fixed.

Every decision depends on row contents only, never on block boundaries: changing
`data.block_mb` or re-partitioning the source changes nothing in the output. Limits: a
quoted CSV field may not contain a line break (byte ranges split at line ends), and a
compressed CSV is read by one task as a stream (still in bounded memory).

The package, by job: `blocks` (pass 1: parse the source into scratch blocks, read them
back), `schema` (type every column from all blocks' counts), `cleaning` (typed rows, bad
rows, each row's split), `profiling` (pass 2 and the plan it fixes), `writing` (pass 3 and
the whole table).
"""

from tasks.tables.blocks import profile_raw
from tasks.tables.cleaning import clean_block
from tasks.tables.schema import Schema, decide_schema
from tasks.tables.writing import ingest_table, survey

__all__ = ["Schema", "clean_block", "decide_schema", "ingest_table", "profile_raw", "survey"]
