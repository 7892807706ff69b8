"""Suite-wide settings.

One intra-op thread: on a small shared CI machine, OpenMP's spinning threads can make tiny
training steps many times slower; subprocesses inherit OMP_NUM_THREADS.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
