"""Serving a k2 model: `k2 serve` (an OpenAI-compatible HTTP server) and `k2 chat` (a terminal chat).

    engine.py   continuous batching over the MLA latent cache (torch only)
    turns.py    OpenAI messages -> prompt ids; generated ids -> content / tool calls (torch only)
    tools.py    tool worlds for the terminal chat (a dict name -> (schema, fn))
    schemas.py  request validation and response bodies (pydantic: the `serve` extra)
    app.py      the FastAPI app                       (the `serve` extra)
    server.py   uvicorn in the foreground or a thread  (the `serve` extra)

`k2 chat` needs only the core dependencies; `k2 serve` needs `pip install 'k2cli[serve]'`.
"""
