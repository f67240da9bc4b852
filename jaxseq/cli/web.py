"""``jaxseq monitor`` and ``jaxseq serve-api``: a swarm's client that serves HTTP, until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse

from jaxseq.client.config import ClientConfig
from jaxseq.client.model import DistributedCausalLM
from jaxseq.client.remote_manager import RemoteSequenceManager
from jaxseq.client.text import TextCodec
from jaxseq.web.completions import CompletionsApi
from jaxseq.web.monitor import monitor_app
from jaxseq.web.serving import serve


def run_monitor(args: argparse.Namespace) -> None:
    # A server that doesn't answer within a few seconds is shown unreachable, not waited for.
    config = ClientConfig(connect_timeout=min(3.0, args.refresh), request_timeout=15.0)
    with RemoteSequenceManager(args.initial_peers, args.dht_prefix, config) as manager:
        app = monitor_app(manager, refresh_seconds=args.refresh, forget_after=args.forget_after)
        serve(app, args.host, args.port, "jaxseq monitor")


def run_api(args: argparse.Namespace) -> None:
    with RemoteSequenceManager(args.initial_peers, args.dht_prefix, ClientConfig()) as manager:
        model = DistributedCausalLM(args.checkpoint, manager)
        name = args.model_name or args.dht_prefix
        api = CompletionsApi(model, TextCodec(args.checkpoint), name, args.max_sessions, args.max_tokens_limit)
        serve(api.app(), args.host, args.port, "jaxseq serve-api")
