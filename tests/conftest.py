import os

# Triton kernels are tested on CPU through its interpreter, which must be chosen before triton is
# imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "rfq",
    deadline=None,
    max_examples=int(os.environ.get("RFQ_HYPOTHESIS_EXAMPLES", "200")),
    derandomize=True,  # CI runs are reproducible; set RFQ_HYPOTHESIS_RANDOM=1 to explore
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("rfq-random", parent=settings.get_profile("rfq"), derandomize=False)
settings.load_profile("rfq-random" if os.environ.get("RFQ_HYPOTHESIS_RANDOM") else "rfq")


def test_devices():
    """Devices to run kernel tests on: RFQ_TEST_DEVICE=cpu,cuda or every available one."""
    wanted = os.environ.get("RFQ_TEST_DEVICE")
    if wanted:
        return [d.strip() for d in wanted.split(",") if d.strip()]
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=test_devices())
def device(request):
    return request.param
