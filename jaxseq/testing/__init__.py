"""Support for tests, benchmarks and the demo: ``LocalSwarm``, an in-process swarm of real block
backends behind the real client logic, with fault injection (``local_swarm``); ``ServerProcess``,
which starts ``jaxseq-server`` processes and stops them by PID (``launch``); and relays that put each
server behind a link of set round-trip time and bandwidth, as if on another host (``link``).
"""
