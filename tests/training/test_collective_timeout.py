"""A collective whose peer never arrives fails after ``train.collective_timeout_s`` instead of blocking for ever."""

import os
import socket
import subprocess
import sys

import pytest

SCRIPT = """
import sys, time
import torch, torch.distributed as dist
from sat_video.training.distributed import exit_process, init_distributed
env = init_distributed(collective_timeout_s=3)
if env.rank == 1:
    time.sleep(30)  # a peer that stopped: never joins the all-reduce
else:
    started = time.monotonic()
    try:
        dist.all_reduce(torch.ones(4))
    except Exception as err:
        print(f"failed after {time.monotonic() - started:.1f} s: {type(err).__name__}", flush=True)
        exit_process(0)  # the group's gloo threads live on: finalizing the interpreter under them can abort
    sys.exit("the all-reduce returned without its peer")
"""


@pytest.mark.slow
def test_an_all_reduce_without_its_peer_fails_after_the_configured_timeout():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT], env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    try:
        out, err = procs[0].communicate(timeout=60)
        assert procs[0].returncode == 0, err[-3000:]
        seconds = float(out.split("failed after ")[1].split(" s")[0])
        assert 2.5 < seconds < 15, out
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
