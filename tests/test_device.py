import types

import pytest
import torch

from kernelhub import device


@pytest.mark.parametrize("name, key", [
    ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA A100-PCIE-40GB", "a100"),
    ("NVIDIA A800-SXM4-80GB", "a800"),
    ("NVIDIA H100 80GB HBM3", "h100"),
    ("NVIDIA H100 PCIe", "h100"),
    ("NVIDIA H200", "h200"),
    ("NVIDIA H20", "h20"),
    ("NVIDIA L40S", "l40s"),
    ("NVIDIA L40", "l40"),
    ("NVIDIA L4", "l4"),
    ("NVIDIA A10G", "a10g"),
    ("NVIDIA GeForce RTX 4090", "rtx4090"),
    ("AMD Instinct MI300X", "mi300x"),
    ("NVIDIA Some Future GPU 9000 (rev 2)", "some-future-gpu-9000-rev-2"),
])
def test_key_for_name(name, key):
    assert device.key_for_name(name) == key


def _fake_gpu(monkeypatch, name="NVIDIA H100 80GB HBM3"):
    props = types.SimpleNamespace(name=name, major=9, minor=0, multi_processor_count=132,
                                  total_memory=80 * 2**30, shared_memory_per_block_optin=232448)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    device._detect.cache_clear()


def test_gpu_identity_is_complete(monkeypatch):
    _fake_gpu(monkeypatch)
    ident = device.current_device()
    assert (ident.key, ident.vendor, ident.compute_capability, ident.sm_count) == ("h100", "nvidia", "9.0", 132)
    assert ident.shared_memory_bytes == 232448 and ident.memory_bytes == 80 * 2**30
    assert ident.torch_version == torch.__version__ and ident.is_gpu
    device._detect.cache_clear()


def test_env_overrides_gpu_key_but_not_cpu(monkeypatch):
    monkeypatch.setenv("KERNELHUB_GPU", "Fleet H100 Variant")
    assert device.device_for_tensor(torch.zeros(1)).key == "cpu"
    _fake_gpu(monkeypatch)
    assert device.current_device().key == "h100"  # the override goes through the same name table
    monkeypatch.setenv("KERNELHUB_GPU", "myfleet")
    assert device.current_device().key == "myfleet"
    device._detect.cache_clear()


def test_cpu_identity(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ident = device.current_device()
    assert ident.key == "cpu" and not ident.is_gpu
    assert ident.shared_memory_bytes == device.DEFAULT_SMEM_BYTES
    assert "no GPU" in ident.describe()
