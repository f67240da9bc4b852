"""Support for tests, benchmarks and the demo: ``LocalSwarm``, an in-process swarm of real block
backends behind the real client logic, with fault injection (``local_swarm``), and ``ServerProcess``,
which starts ``jaxseq-server`` processes and stops them by PID (``launch``).
"""
