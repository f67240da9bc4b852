"""The swarm on the web: ``jaxseq monitor`` (a live page of who holds which blocks) and ``jaxseq serve-api``
(an OpenAI-compatible HTTP API that generates through the swarm). Each runs as its own process, a client of
the swarm that serves HTTP (Starlette on uvicorn)."""
