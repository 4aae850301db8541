"""Config lookup for a call: exact bucket -> nearest bucket -> DEFAULT, and what it refuses."""

import dataclasses
import warnings

import pytest
import torch

from kernelhub import configs
from kernelhub.db import BestConfig, ConfigStore
from kernelhub.device import current_device
from kernelhub.kernels.int8_gemm import space
from kernelhub.kernels.int8_gemm.spec import SPEC

CPU = current_device()  # the tests run without a GPU: the `cpu` identity
TUNED = dict(space.DEFAULT_LARGE_M, BLOCK_M=64, BLOCK_N=64, num_warps=4)


def _store_best(url, bucket, config, *, dtype="int32", kernel_version=None, gpu_key=CPU.key,
                triton_version=CPU.triton_version, device=None):
    with ConfigStore(url) as store:
        store.save_best(BestConfig(
            gpu_key=gpu_key, family=SPEC.name, bucket=bucket, dtype=dtype, config=config,
            median_ms=1.0, p20_ms=0.9, p80_ms=1.1, throughput=None, throughput_unit=None,
            default_median_ms=2.0, trials=10, kernel_version=kernel_version or SPEC.kernel_version,
            triton_version=triton_version, torch_version=torch.__version__, cuda_version=None,
            device=device))


def _lookup(shape, dtype="int32"):
    return configs.best_config(SPEC, shape, dtype, CPU)


def test_no_database_gives_default_and_creates_nothing(private_config_db, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing database is normal: no warning
        assert _lookup((1, 4096, 4096)) == space.DEFAULT_SMALL_M
        assert _lookup((1000, 4096, 4096)) == space.DEFAULT_LARGE_M
    assert not (tmp_path / "configs.sqlite").exists()


def test_exact_bucket(private_config_db):
    _store_best(private_config_db, "M=128,N=4096,K=4096", TUNED)
    assert _lookup((128, 4096, 4096)) == TUNED
    assert _lookup((100, 4096, 4096)) == TUNED  # 100 falls in the 128 bucket


def test_nearest_bucket_within_two_doublings(private_config_db):
    _store_best(private_config_db, "M=128,N=4096,K=4096", TUNED)
    assert _lookup((512, 4096, 4096)) == TUNED  # two doublings away
    assert _lookup((1024, 4096, 4096)) == space.DEFAULT_LARGE_M  # three: too far
    assert _lookup((128, 4096, 14336)) == space.DEFAULT_LARGE_M  # other K: never
    assert _lookup((128, 4096, 4096), "bfloat16") == space.DEFAULT_LARGE_M  # other dtype: never


def test_nearest_prefers_larger_m_on_a_tie(private_config_db):
    small = dict(TUNED, BLOCK_M=32)
    _store_best(private_config_db, "M=64,N=4096,K=4096", small)
    _store_best(private_config_db, "M=256,N=4096,K=4096", TUNED)
    assert _lookup((128, 4096, 4096)) == TUNED


def test_other_kernel_version_and_other_gpu_are_ignored(private_config_db):
    _store_best(private_config_db, "M=128,N=4096,K=4096", TUNED, kernel_version="0" * 16)
    _store_best(private_config_db, "M=128,N=4096,K=4096", TUNED, gpu_key="h100")
    assert _lookup((128, 4096, 4096)) == space.DEFAULT_LARGE_M


def test_rows_from_another_triton_major_or_another_chip_are_stale(private_config_db):
    _store_best(private_config_db, "M=128,N=4096,K=4096", TUNED, triton_version="2.3.1")
    other_chip = dataclasses.replace(CPU, name="bigger cpu", sm_count=132).to_dict()
    _store_best(private_config_db, "M=256,N=4096,K=4096", TUNED, device=other_chip)
    assert _lookup((128, 4096, 4096)) == space.DEFAULT_LARGE_M
    same_chip = dataclasses.replace(CPU, name="cpu, other memory size").to_dict()
    _store_best(private_config_db, "M=512,N=4096,K=4096", TUNED, device=same_chip)
    configs.clear_cache()
    assert _lookup((512, 4096, 4096)) == TUNED  # same key, same chip: shared


@pytest.mark.parametrize("bad_config, fragment", [
    (dict(TUNED, BLOCK_M=48), "BLOCK_M=48 is not one of"),
    ({"BLOCK_M": 64}, "missing keys"),
    (dict(TUNED, BLOCK_M=256, BLOCK_N=256, BLOCK_K=256, num_stages=5), "shared memory"),
], ids=["value-outside-space", "missing-keys", "infeasible-on-this-device"])
def test_corrupt_row_is_never_launched(private_config_db, bad_config, fragment):
    _store_best(private_config_db, "M=8192,N=4096,K=4096", bad_config)
    with pytest.warns(configs.ConfigDBWarning, match=fragment):
        assert _lookup((8192, 4096, 4096)) == space.DEFAULT_LARGE_M


def test_garbage_database_file_falls_back_with_one_warning(private_config_db, tmp_path):
    path = tmp_path / "configs.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.warns(configs.ConfigDBWarning, match="not using the config database") as record:
        assert _lookup((1, 4096, 4096)) == space.DEFAULT_SMALL_M
        configs.clear_cache()
        assert _lookup((1, 4096, 4096)) == space.DEFAULT_SMALL_M
    assert len([w for w in record if issubclass(w.category, configs.ConfigDBWarning)]) == 1
    assert path.read_bytes() == b"this is not a database" * 100


def test_ops_keep_working_on_a_garbage_database(private_config_db, tmp_path, monkeypatch):
    import kernelhub.ops as ops

    (tmp_path / "configs.sqlite").write_bytes(b"\x00garbage" * 64)
    monkeypatch.setenv("KERNELHUB_BACKEND", "triton")
    a = torch.randint(-128, 128, (3, 40), dtype=torch.int8)
    b = torch.randint(-128, 128, (40, 5), dtype=torch.int8)
    with pytest.warns(configs.ConfigDBWarning):
        assert torch.equal(ops.int8_gemm(a, b), (a.long() @ b.long()).int())


def test_repeated_calls_do_not_query_the_database(private_config_db, monkeypatch):
    _store_best(private_config_db, "M=128,N=4096,K=4096", TUNED)
    reads = []
    original = configs._read_rows
    monkeypatch.setattr(configs, "_read_rows", lambda *a: reads.append(a) or original(*a))
    for m in (128, 128, 100, 128):
        assert _lookup((m, 4096, 4096)) == TUNED
    assert len(reads) == 1


def test_database_from_a_newer_kernelhub_falls_back(private_config_db, monkeypatch):
    from kernelhub.db import store as store_module

    _store_best(private_config_db, "M=128,N=4096,K=4096", TUNED)
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", 0)  # this process now reads an older schema
    with pytest.warns(configs.ConfigDBWarning, match="newer kernelhub"):
        assert _lookup((128, 4096, 4096)) == space.DEFAULT_LARGE_M


def test_row_status_judges_rows_with_the_callers_lookup():
    """The core looks no family up itself: `row_status` asks the lookup it is given, so an unknown
    family is `UNKNOWN_KERNEL` and a lookup that fails otherwise (a broken KERNELHUB_FAMILIES) raises."""
    from kernelhub.errors import KernelhubError, UnknownFamilyError

    def lookup(name):
        if name != SPEC.name:
            raise UnknownFamilyError(name)
        return SPEC

    row = BestConfig(gpu_key=CPU.key, family=SPEC.name, bucket="M=128,N=4096,K=4096", dtype="int32", config=TUNED,
                     median_ms=1.0, p20_ms=0.9, p80_ms=1.1, throughput=None, throughput_unit=None,
                     default_median_ms=2.0, trials=10, kernel_version=SPEC.kernel_version,
                     triton_version=CPU.triton_version, torch_version=torch.__version__, cuda_version=None, device=None)
    assert configs.row_status(row, CPU, lookup) == "ok"
    assert configs.row_status(dataclasses.replace(row, kernel_version="0" * 16), CPU, lookup) == "stale: kernel changed"
    assert configs.row_status(dataclasses.replace(row, family="gone"), CPU, lookup) == configs.UNKNOWN_KERNEL
    assert configs.row_status(dataclasses.replace(row, bucket="M=1"), CPU, lookup).startswith("invalid:")

    def broken(name):
        raise KernelhubError("KERNELHUB_FAMILIES: cannot import 'x'")

    with pytest.raises(KernelhubError, match="cannot import"):
        configs.row_status(row, CPU, broken)
