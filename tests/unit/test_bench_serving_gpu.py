"""The GPU serving benchmark refuses to run without CUDA, with a clear message."""

from __future__ import annotations

import pytest
import torch

from bench import serving_gpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_exits_with_a_clear_message_without_cuda(capsys):
    assert serving_gpu.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_adapter_bytes_count_a_and_b_of_every_target_and_layer():
    size = serving_gpu.LLAMA3_8B
    q_only = serving_gpu._adapter_bytes(size, ("q_proj",), 2)
    assert q_only == size.layers * serving_gpu.RANK * (2 * size.hidden) * 2
