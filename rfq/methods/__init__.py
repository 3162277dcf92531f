"""One package per mixed-precision method, each built on rfq.ops, rfq.nn, rfq.training and
rfq.cost: ``rfq`` (the main method: weight-coupled training + greedy and frontier searches) and
``dfmpc`` (DF-MPC: data-free low/high compensation of a float model)."""
