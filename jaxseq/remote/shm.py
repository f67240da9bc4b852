"""Same-host tensor exchange through sealed memory files: a jaxseq extension to Petals' protocol.
This module holds what both halves agree on; the client's half is ``jaxseq.client.shm``, the
server's ``jaxseq.server.shm``.

When a jaxseq client and a jaxseq server run on one machine (the server announces this machine's
``machine_id`` in ``ServerInfo.machine``), a request carries no tensor bytes. The client keeps a pool
of memory files (``memfd``), writes its inputs into one, and names in the request's metadata
(``METADATA_KEY``) its process id, the files, and where the inputs are and where the results must
go: ``{"pid", "segments": [[fd, inode, size]], "inputs"/"outputs": [[segment, offset, dtype, shape]]}``.
The server maps the files once (mappings are cached), reads the inputs in place and writes the
results in place; the client hands the results on as views of its file, which goes back to the pool
when the last view is released. That is one memory copy each way, instead of serialization through
two p2pd daemons and a socket.

The files are sealed against resizing (``SEALS``), so a client can't make a server fault (SIGBUS)
by truncating a mapped file, and a server maps only sealed files owned by its own user. Petals
peers never see any of this: Petals servers don't announce a machine, Petals clients never send the key.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

METADATA_KEY = "jaxseq_shm"
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
MAX_SEGMENTS = 2  # one for the inputs, one for the results
MAX_PLACES = 8  # inputs and outputs of one request, in all
MAX_NDIM = 4


def machine_id() -> str | None:
    """This machine's identity for the current boot and pid namespace, or None where memory files can't
    be shared.

    Example:
        >>> machine_id() == machine_id()
        True
    """
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        pid_namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    return f"{socket.gethostname()}/{boot}/{pid_namespace}" if hasattr(os, "memfd_create") else None
