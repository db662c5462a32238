"""What a worker has: detected capability (``detect``), intersected with its host's declared
policy (``policy``)."""

from trainfleet.capability.detect import detect_capability
from trainfleet.capability.model import Capability

__all__ = ["Capability", "detect_capability"]
