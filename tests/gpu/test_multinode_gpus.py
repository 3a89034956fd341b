"""Two "nodes" on one GPU machine, each launcher with its own GPU (DeepSpeed --no_ssh, include
node0:0@node1:1), joined under NCCL into one run that stops and resumes: the CPU test of
tests/test_multinode.py, run here on GPUs."""
from __future__ import annotations

import sys
from pathlib import Path

from tests.gpu.support import needs_gpus

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the CPU test's own helpers

from test_multinode import test_two_nodes_without_ssh_train_one_run_stop_and_resume as test_two_gpu_nodes  # noqa: E402,F401

pytestmark = needs_gpus(2)
