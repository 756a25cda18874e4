"""The memctl daemon: spill store, readings, threshold engine and gRPC servicers."""
