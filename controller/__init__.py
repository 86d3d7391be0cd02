"""The goodput controller: acceptance estimates, step-cost model and the speculation planner."""
