"""autoquant.hardware on CUDA, checked on any machine: the seams (torch's device properties, the
driver version, NVML's device list) are replaced by fixed answers, as a GPU machine would give
them. What is tested: one GPU gets one cache key whether NVML works or not, and NVML's record is
found by UUID (CUDA_VISIBLE_DEVICES reorders torch's indices; MIG instances have none in NVML)."""

from __future__ import annotations

import re

import pytest
import torch

from autoquant import hardware
from autoquant.hardware import CudaFacts, NvmlDevice, environment, nvml_facts

H200_UUID = "5a6b7c8d-0000-1111-2222-333344445555"
OTHER_UUID = "01234567-89ab-cdef-0123-456789abcdef"
MIG_UUID = "fedcba98-7654-3210-fedc-ba9876543210"
DRIVER = "580.159.03"


def _torch_facts(uuid: str = H200_UUID, sms: int = 132, memory_mb: int = 143_771) -> CudaFacts:
    return CudaFacts(name="NVIDIA H200", uuid=uuid, capability="9.0", sms=sms, memory_mb=memory_mb)


def _nvml_list() -> list[NvmlDevice]:
    """A machine with two GPUs in NVML's order; torch (CUDA_VISIBLE_DEVICES=1) sees the second."""
    return [
        NvmlDevice(uuid=OTHER_UUID, name="NVIDIA H100 80GB HBM3", memory_mb=81_559, driver=DRIVER, mig=False),
        NvmlDevice(uuid=H200_UUID, name="NVIDIA H200", memory_mb=143_771, driver=DRIVER, mig=False),
    ]


def _nvml_fails() -> list[NvmlDevice]:
    raise OSError("NVML Shared Library Not Found")


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch):
    """Torch index 0 is the H200 with H200_UUID; the driver API version reads "13.0"."""

    def install(facts: CudaFacts = _torch_facts(), nvml=_nvml_list) -> None:
        monkeypatch.setattr(hardware, "_torch_cuda_facts", lambda index: facts)
        monkeypatch.setattr(hardware, "_cuda_driver_version", lambda: "13.0")
        monkeypatch.setattr(hardware, "_nvml_devices", nvml)

    return install


def test_cuda_key_is_the_same_whether_nvml_works_or_not(fake_gpu):
    fake_gpu(nvml=_nvml_list)
    with_nvml = environment("cuda:0")
    fake_gpu(nvml=_nvml_fails)
    without_nvml = environment("cuda:0")
    assert with_nvml == without_nvml
    assert with_nvml.hash == without_nvml.hash
    assert with_nvml.sku == "NVIDIA H200" and with_nvml.driver == "13.0" and with_nvml.units == 132


def test_mig_instances_key_apart_from_the_whole_gpu(fake_gpu):
    fake_gpu(_torch_facts())
    whole = environment("cuda:0")
    fake_gpu(_torch_facts(uuid=MIG_UUID, sms=16, memory_mb=17_920))
    slice_ = environment("cuda:0")
    assert whole.hash != slice_.hash


def test_nvml_record_is_found_by_uuid_not_by_index(fake_gpu):
    # torch's cuda:0 is NVML's device 1 (as under CUDA_VISIBLE_DEVICES=1): asking NVML for index 0
    # would describe the H100.
    fake_gpu(nvml=_nvml_list)
    found = nvml_facts("cuda:0")
    assert found is not None
    assert found.uuid == H200_UUID and found.name == "NVIDIA H200" and found.driver == DRIVER


def test_nvml_record_of_a_mig_instance(fake_gpu):
    mig = NvmlDevice(uuid=MIG_UUID, name="NVIDIA H200 MIG 1g.18gb", memory_mb=17_920, driver=DRIVER, mig=True)
    fake_gpu(_torch_facts(uuid=MIG_UUID, sms=16, memory_mb=17_920), nvml=lambda: [*_nvml_list(), mig])
    assert nvml_facts("cuda:0") == mig


def test_no_nvml_record_when_nvml_fails_or_lacks_the_uuid(fake_gpu):
    fake_gpu(nvml=_nvml_fails)
    assert nvml_facts("cuda:0") is None
    fake_gpu(_torch_facts(uuid="99999999-0000-0000-0000-000000000000"), nvml=_nvml_list)
    assert nvml_facts("cuda:0") is None


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("GPU-5A6B7C8D-0000-1111-2222-333344445555", H200_UUID),
        ("MIG-fedcba98-7654-3210-fedc-ba9876543210", MIG_UUID),
        (H200_UUID, H200_UUID),
        (b"GPU-01234567-89ab-cdef-0123-456789abcdef".decode(), OTHER_UUID),
    ],
    ids=["gpu-prefix-upper", "mig-prefix", "bare-torch", "decoded-bytes"],
)
def test_uuids_compare_in_one_canonical_form(raw, canonical):
    assert hardware._canonical_uuid(raw) == canonical


def test_driver_version_reads_as_major_minor_or_nothing():
    # "" where no libcuda exists (a CPU machine), "13.0"-like where one does.
    assert re.fullmatch(r"(\d+\.\d+)?", hardware._cuda_driver_version())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU in this process")
def test_real_gpu_torch_and_nvml_agree_on_the_device():
    facts = hardware._torch_cuda_facts(0)
    assert facts.uuid and facts.sms > 0 and facts.memory_mb > 0
    assert re.fullmatch(r"\d+\.\d+", hardware._cuda_driver_version())
    try:
        import pynvml  # noqa: F401
    except ImportError:
        pytest.skip("nvidia-ml-py is not installed")
    found = nvml_facts("cuda:0")
    assert found is not None, "NVML lists no device with torch's UUID for cuda:0"
    assert found.uuid == facts.uuid
