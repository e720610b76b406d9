"""Test-wide settings: one compute thread per process.

Tests start kdcache subprocesses while the pytest process holds its own torch threads; on a
2-core machine two processes of 2 OpenMP threads each spin against each other (30x slower).
"""

import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by every kdcache subprocess
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)
