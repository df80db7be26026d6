"""A new rollout backend, whole: transformers `generate` (the HF worker) that also counts the
calls it served. `plugins: [tests.plugins.counting_backend]` and `rollout.backend: counting_hf`
select it."""

from rlfleet.common.registry import ROLLOUT_BACKENDS
from rlfleet.rollout.hf_worker import HFRolloutWorker
from rlfleet.rollout.worker_info import BackendCapabilities


@ROLLOUT_BACKENDS.register("counting_hf")
class CountingHFWorker(HFRolloutWorker):
    capabilities = BackendCapabilities(calls_at_once=1, sleep=True)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def generate(self, prompts, spec):
        self.calls += 1
        return super().generate(prompts, spec)

    def served(self) -> int:
        return self.calls
