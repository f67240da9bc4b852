"""Both sides: the model's shape (``config``), the model families (``family``, ``registry`` and one module
each), their blocks as pure JAX functions (``decoder``), the one check of a span's inputs (``inputs``) and
Hugging Face checkpoints (``checkpoint``, ``hub``). Clients run the embedding and head from here, servers
the blocks.
"""
