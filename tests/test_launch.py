"""Processes that tests start end whole: ``LaunchedProcess.terminate`` leaves nothing of the process group."""

from __future__ import annotations

import sys

from jaxseq.testing.launch import LaunchedProcess

# A parent that dies of SIGTERM, leaving a forked child behind (as a hivemind DHT process would be left).
PARENT_AND_CHILD = """
import os, time
if os.fork() == 0:
    time.sleep(60)
    os._exit(0)
print("up", flush=True)
time.sleep(60)
"""


def test_terminate_leaves_nothing_of_the_process_group():
    process = LaunchedProcess([sys.executable, "-c", PARENT_AND_CHILD], ready="up").wait_ready(timeout=30)
    assert process.terminate() == -15
    assert not process.group_alive()
