"""A stage's weight residency: the state machine (load, offload, release) and its gRPC servicer."""
