"""CPU runtime mechanics, apart from the model: worker threads, scratch memory, the C heap.

The owner of a model run (:class:`~ttsr.inference.Upscaler`, the training module) makes a
:class:`CPURuntime` and passes it to the model's forward; without one the model runs on plain
PyTorch and gives the same result.
"""

from ttsr.runtime.heap import keep_freed_memory
from ttsr.runtime.runtime import PLAIN, CPURuntime, Runtime
from ttsr.runtime.scratch import ScratchArena, StepBuffers

__all__ = ["PLAIN", "CPURuntime", "Runtime", "ScratchArena", "StepBuffers", "keep_freed_memory"]
