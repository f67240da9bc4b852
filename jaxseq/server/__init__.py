"""The server: what runs in a ``jaxseq-server`` process. Its settings (``config``) and entry point
(``main``), the RPC handler (``handler``) with its request checks (``validation``) and compute queue
(``compute_queue``), the blocks' jitted computation (``backend``) with its ``activation_cache``, and
the server's half of same-machine shared memory (``shm``). Nothing here imports the client.
"""
