"""Knowledge rephrasing (Kimi K2 section 2.2): more diverse tokens from the same facts.

    styles.py     the prompt library: style and perspective instructions, the request messages
    chunking.py   sentence-aware chunks under a token budget
    fidelity.py   per-chunk verification: every fact survives, nothing is invented, similarity
    backends.py   the backend interface and factory; builtin.py, k2_backend.py, openai_backend.py
    pipeline.py   jobs, autoregressive chunk rounds, retries, shards, resume, counts

The `k2 rephrase` command (k2cli.stages.rephrase) wires these to dataset artifacts.
"""
