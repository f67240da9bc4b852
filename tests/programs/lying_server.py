"""A jaxseq-server that lies, for tests only: the shipped server has no such flag.

python tests/programs/lying_server.py {nan|shape|noise|hang} [jaxseq-server arguments...]
"""

import sys
import time

import numpy as np

from jaxseq.server import main as server
from jaxseq.server.backend import BlockBackend

LIES = {
    "nan": lambda out: np.full_like(out, np.nan),
    "shape": lambda out: out[:, :-1] if out.shape[1] > 1 else np.concatenate([out, out], axis=1),
    "noise": lambda out: (
        out + 1e-3 * np.abs(out).mean() * np.random.default_rng(0).standard_normal(out.shape).astype(out.dtype)
    ),
}


def main() -> int:
    lie, argv = sys.argv[1], sys.argv[2:]
    honest_forward, honest_backward = BlockBackend.forward, BlockBackend.backward

    def forward(self, *args, **kwargs):
        if lie == "hang":
            time.sleep(3600)
        return LIES[lie](honest_forward(self, *args, **kwargs))

    def backward(self, *args, **kwargs):
        if lie == "hang":
            time.sleep(3600)
        grads = honest_backward(self, *args, **kwargs)
        return grads._replace(inputs=LIES[lie](grads.inputs))

    BlockBackend.forward, BlockBackend.backward = forward, backward
    # The server measures its throughput with a forward at start; a lying one announces a high one instead.
    return server.main(argv + ["--throughput", "1e9"])


if __name__ == "__main__":
    sys.exit(main())
