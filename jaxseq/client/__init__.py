"""The client: what runs in the user's process. The Flax model (``model``), the ``jax.custom_vjp``
(``primitive``) and its host callbacks (``calls``), the fault-tolerant chain of spans (``chain``), the
sequence manager (``manager``; over the network, ``remote_manager``) with its routing, cross-checks
(``verification``) and the client's half of same-machine shared memory (``shm``). Nothing here is
imported by a server.
"""
