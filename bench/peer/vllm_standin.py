"""Stand-in for the three vLLM imports of vLLM's MiniMax-M3 Triton ops
(copied next to them by tools/fetch-vllm-ops.sh as ``_vllm_standin``):
``vllm.platforms.current_platform``, ``vllm.triton_utils`` (``tl``,
``triton``) and ``vllm.utils.math_utils.round_up``. It answers as vLLM's CUDA
platform does, so the kernels take the same paths as in a vLLM server."""

import torch
import triton
import triton.language as tl

__all__ = ["current_platform", "tl", "triton", "round_up"]


class _CudaPlatform:
    """The subset of vLLM's CudaPlatform the ops call."""

    def is_cuda(self):
        return torch.cuda.is_available() and torch.version.hip is None

    def is_rocm(self):
        return torch.version.hip is not None

    def get_device_capability(self):
        return torch.cuda.get_device_capability()

    def is_device_capability(self, capability):
        # vLLM: an exact match of (major, minor), or of major * 10 + minor
        major, minor = torch.cuda.get_device_capability()
        if isinstance(capability, int):
            return major * 10 + minor == capability
        return (major, minor) == tuple(capability)

    def is_arch_support_pdl(self):
        # vLLM's CUDA platform: programmatic dependent launch from sm_90 on
        return self.is_cuda() and torch.cuda.get_device_capability()[0] >= 9


current_platform = _CudaPlatform()


def round_up(x, y):
    return ((x + y - 1) // y) * y
