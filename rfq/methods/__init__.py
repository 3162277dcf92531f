"""One package per mixed-precision method, each built on rfq.ops, rfq.nn, rfq.training and
rfq.cost: ``rfq`` (the main method: weight-coupled training + greedy and frontier searches) and
``dfmpc`` (DF-MPC: data-free low/high compensation of a float model) and ``hotswap`` (one
model switching 8..1 bits). The run loader of ``rfq`` builds another method's model through the
builder that method's package registers (``rfq.methods.rfq.trainer.RUN_MODEL_BUILDERS``), so no
method imports one listed after it."""
