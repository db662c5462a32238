"""What a worker has: detected capability, intersected with its host's declared policy."""

from trainfleet.capability.detect import detect_capability
from trainfleet.capability.model import Capability
from trainfleet.capability.policy import effective_capability, job_allowed_on_host

__all__ = ["Capability", "detect_capability", "effective_capability", "job_allowed_on_host"]
