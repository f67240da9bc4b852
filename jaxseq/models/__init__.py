"""Both sides: the model's shape (``config``), its blocks as pure JAX functions (``llama``), the one
check of a span's inputs (``inputs``) and Hugging Face checkpoints (``checkpoint``). Clients run the
embedding and head from here, servers the blocks.
"""
