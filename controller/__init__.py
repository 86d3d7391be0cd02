"""The goodput controller: acceptance estimates, step-cost model and the speculation planner.

Every process that plans or fits (verifier, controller) imports this package, so it also
sets NumPy's BLAS to one thread for the process. The planner and the cost fit work on
arrays of a few hundred numbers every step, where threads gain nothing; but OpenBLAS keeps
its idle workers spinning for a while after each call, on the cores the target's forward
runs on. Measured at batch 1 on 2 cores: the same verify forward took 15–60% longer with
two BLAS threads than with one (BENCHMARKS.md, "One BLAS thread"). torch's own threads are
not affected.
"""

import numpy  # noqa: F401  (loads the BLAS library that the limit applies to)
from threadpoolctl import threadpool_limits

threadpool_limits(1, user_api="blas")
