"""The student's rollouts: the flow-matching schedule, the eager and the CUDA-graph runners (one interface)."""
