"""Importing the controller library leaves NumPy's BLAS one thread and torch's threads alone."""

from __future__ import annotations

import json
import subprocess
import sys


def test_importing_the_controller_limits_blas_to_one_thread_only():
    code = (
        "import torch; torch.set_num_threads(2)\n"
        "import controller\n"
        "from threadpoolctl import threadpool_info\n"
        "blas = [i['num_threads'] for i in threadpool_info() if i['user_api'] == 'blas']\n"
        "import json; print(json.dumps([blas, torch.get_num_threads()]))\n"
    )
    # A fresh interpreter with BLAS free to use 2 threads: the limit must come from the import.
    env = {"OPENBLAS_NUM_THREADS": "2", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    blas, torch_threads = json.loads(out)
    assert blas and set(blas) == {1}, out
    assert torch_threads == 2
