"""``dm-preprocess`` / ``python launch/preprocess.py``: run, verify, inspect, stats, cost, batch, split-input.

    dm-preprocess run --input data.jsonl --output out/ --extractor rules --fraction code=0.1,math=0.5
    dm-preprocess verify out/              # exit status 1 and one line per problem if damaged
    dm-preprocess inspect out/ --index 3   # sample 3 with info-dense tokens highlighted
    dm-preprocess stats out/ --rejects 5   # the summary table again, plus the first rejects
    dm-preprocess cost --input data.jsonl --model gpt-4o --fraction code=0.1,math=0.5   # LLM dry run
    dm-preprocess batch submit|status|collect --input data.jsonl --option cache_dir=c   # Batch API
    dm-preprocess split-input big.jsonl.zst --parts 256 --output parts/  # one stream -> 256 files

One module per subcommand, each with its ``add_parser`` (the flags) and ``command`` (what it does):
``run`` (with ``--dry-run``), ``verify``, ``inspect_samples`` (``inspect``), ``stats``, ``cost``, ``batch``,
``split_input``.
``args`` holds what several share (the input and field-mapping flags, ``K=V`` values), ``main`` the
parser, the dispatch and the one-line error handling.  ``run`` flags mirror ``PreprocessConfig``
field by field (see ``docs/preprocess.md``).  Every command that reads records (run, cost, batch)
reads them through ``preprocess.records`` with the same field-mapping flags.
"""
