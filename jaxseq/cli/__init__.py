"""The ``jaxseq`` command: ``jaxseq demo``, ``generate``, ``swarm``, ``monitor`` and ``serve-api``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from jaxseq.models.registry import FAMILIES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxseq", description="Train through a swarm of servers holding a model's blocks."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="a local swarm and a prompt-tuning run through it, with a server killed halfway"
    )
    demo.add_argument(
        "--checkpoint", help="a Hugging Face checkpoint, folder or hub id (default: a small random one, built once)"
    )
    demo.add_argument(
        "--family", default="llama", choices=sorted(FAMILIES), help="the small random model's family (default llama)"
    )
    demo.add_argument("--steps", type=int, default=100, help="training steps (default 100)")
    demo.add_argument("--servers", type=int, default=3, help="jaxseq-server processes to start (default 3)")
    demo.add_argument("--no-kill", action="store_true", help="don't SIGKILL a server halfway")
    demo.add_argument("--out", help="folder for loss.png (default ./jaxseq-demo)")

    generate = commands.add_parser("generate", help="generate text through a swarm, streamed as it comes")
    generate.add_argument("prompt", help="the text to continue (token ids, space-separated, without tokenizer.json)")
    generate.add_argument("--initial-peers", nargs="+", required=True, help="multiaddrs of peers in the swarm")
    generate.add_argument("--dht-prefix", required=True, help="the model's name in the swarm")
    generate.add_argument("--checkpoint", required=True, help="the checkpoint the swarm serves (folder or hub id)")
    generate.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    generate.add_argument("--sample", action="store_true", help="sample instead of the greedy choice")
    generate.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    generate.add_argument("--top-p", type=float, default=1.0, help="sampling's nucleus (default 1: all tokens)")

    swarm = commands.add_parser("swarm", help="a table of the servers of a model in a swarm")
    swarm.add_argument("--initial-peers", nargs="+", required=True, help="multiaddrs of peers in the swarm")
    swarm.add_argument("--dht-prefix", required=True, help="the model's name in the swarm")
    swarm.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for the swarm")

    monitor = commands.add_parser("monitor", help="a live web page of the swarm: who holds which blocks, and how")
    _swarm_options(monitor, port=8000)
    monitor.add_argument("--refresh", type=float, default=5.0, help="seconds between looks at the swarm (default 5)")
    monitor.add_argument(
        "--forget-after", type=float, default=600.0, help="seconds a gone server stays on the page (default 600)"
    )

    api = commands.add_parser(
        "serve-api", help="an OpenAI-compatible API (completions, chat) generating through the swarm"
    )
    _swarm_options(api, port=8001)
    api.add_argument("--checkpoint", required=True, help="the checkpoint the swarm serves (folder or hub id)")
    api.add_argument("--model-name", help="the model's id in the API (default: the dht prefix)")
    api.add_argument("--max-sessions", type=int, default=8, help="requests generating at once (default 8)")
    api.add_argument("--max-tokens-limit", type=int, default=1024, help="most tokens per request (default 1024)")
    return parser


def _swarm_options(command: argparse.ArgumentParser, port: int) -> None:
    """The options of a command that serves HTTP about a swarm."""
    command.add_argument("--initial-peers", nargs="+", required=True, help="multiaddrs of peers in the swarm")
    command.add_argument("--dht-prefix", required=True, help="the model's name in the swarm")
    command.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    command.add_argument(
        "--port", type=int, default=port, help=f"port to listen on, 0 for any free one (default {port})"
    )


def _swarm(args: argparse.Namespace) -> int:
    from jaxseq.client.config import ClientConfig
    from jaxseq.client.remote_manager import RemoteSequenceManager
    from jaxseq.client.status import print_status, swarm_status

    config = ClientConfig(request_timeout=args.timeout, connect_timeout=min(5.0, args.timeout))
    with RemoteSequenceManager(args.initial_peers, args.dht_prefix, config) as manager:
        rows = swarm_status(manager)
        print_status(rows, manager.num_blocks, f"swarm {args.dht_prefix}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from jaxseq.cli.demo import run_demo

            run_demo(args.checkpoint, args.steps, args.servers, not args.no_kill, args.out, family=args.family)
            return 0
        if args.command == "generate":
            from jaxseq.cli.generate import generate_text

            generate_text(
                args.initial_peers, args.dht_prefix, args.checkpoint, args.prompt, args.max_new_tokens,
                do_sample=args.sample, temperature=args.temperature, top_p=args.top_p,
            )  # fmt: skip
            return 0
        if args.command == "monitor":
            from jaxseq.cli.web import run_monitor

            run_monitor(args)
            return 0
        if args.command == "serve-api":
            from jaxseq.cli.web import run_api

            run_api(args)
            return 0
        return _swarm(args)
    except KeyboardInterrupt:
        print("jaxseq: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a CLI reports any failure as one line; the traceback is noise to its user
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"jaxseq {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
