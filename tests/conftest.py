"""Suite-wide settings.

One intra-op thread: on a small shared CI machine, OpenMP's spinning threads can make tiny
training steps many times slower; subprocesses inherit OMP_NUM_THREADS. Folder caches go to a
scratch folder ($MIXTRAIN_CACHE, also inherited).
"""

import os
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
# folder caches of the tests go to a scratch folder, never to the user's ~/.cache
os.environ.setdefault("MIXTRAIN_CACHE", tempfile.mkdtemp(prefix="mixtrain-test-cache-"))

import torch  # noqa: E402

torch.set_num_threads(1)
