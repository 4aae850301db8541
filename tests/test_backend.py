"""`KERNELHUB_BACKEND` is read on every call: a change takes effect on the next call, a bad value
is refused every time (never remembered as valid), and the choice depends on the tensor's device."""

import os

import pytest
import torch

import kernelhub.ops as ops
from kernelhub import backend


@pytest.fixture
def cpu_tensor():
    return torch.zeros(2, 3)


def test_unset_and_empty_mean_auto(monkeypatch, cpu_tensor):
    monkeypatch.delenv(backend.BACKEND_ENV, raising=False)
    assert backend.choose(cpu_tensor) == "cpu"
    monkeypatch.setenv(backend.BACKEND_ENV, "")
    assert backend.choose(cpu_tensor) == "cpu"
    monkeypatch.setenv(backend.BACKEND_ENV, "auto")
    assert backend.choose(cpu_tensor) == "cpu"


def test_a_change_takes_effect_on_the_next_call(monkeypatch, cpu_tensor):
    for value in ("reference", "auto", "triton", "reference", "auto"):
        monkeypatch.setenv(backend.BACKEND_ENV, value)
        assert backend.choose(cpu_tensor) == ("cpu" if value == "auto" else value)
    os.environ[backend.BACKEND_ENV] = "reference"  # a plain write, as a user's script would make it
    assert backend.choose(cpu_tensor) == "reference"
    del os.environ[backend.BACKEND_ENV]
    assert backend.choose(cpu_tensor) == "cpu"


@pytest.mark.parametrize("value", ["Triton", "cuda", "reference ", "cpu"])
def test_an_unknown_value_is_refused_on_every_call(monkeypatch, cpu_tensor, value):
    monkeypatch.setenv(backend.BACKEND_ENV, value)
    for _ in range(2):
        with pytest.raises(ValueError, match=rf"KERNELHUB_BACKEND={value!r}: expected one of auto, triton, reference"):
            backend.choose(cpu_tensor)
    monkeypatch.setenv(backend.BACKEND_ENV, "reference")  # and a good value still works after it
    assert backend.choose(cpu_tensor) == "reference"


def test_a_public_op_refuses_an_unknown_value(monkeypatch):
    monkeypatch.setenv(backend.BACKEND_ENV, "fast")
    a = torch.ones(3, 4, dtype=torch.int8)
    with pytest.raises(ValueError, match="KERNELHUB_BACKEND='fast'"):
        ops.int8_gemm(a, a.t())


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch, cpu_tensor):
    monkeypatch.setenv(backend.BACKEND_ENV, "triton")
    assert backend.choose(cpu_tensor) == "triton"  # the suite runs with TRITON_INTERPRET=1
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="KERNELHUB_BACKEND=triton: .*TRITON_INTERPRET=1"):
        backend.choose(cpu_tensor)


def test_meta_tensors_are_not_cuda(cpu_tensor):
    assert backend.choose(torch.empty(2, 3, device="meta")) == "cpu"
