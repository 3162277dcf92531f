"""One package per mixed-precision method, each built on rfq.ops, rfq.nn, rfq.training and
rfq.cost: ``rfq`` (the main method: weight-coupled training + greedy search)."""
