"""Small random checkpoints in real Hugging Face layout, for tests and the demo (`pdmesh make-model`)."""

from pdmesh.modelgen.registry import ARCH_WRITERS, ArchWriter, get_arch, register_arch
from pdmesh.modelgen.writer import write_model

__all__ = ["ARCH_WRITERS", "ArchWriter", "get_arch", "register_arch", "write_model"]
