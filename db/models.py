"""The tables of the config database (SQLAlchemy 2.x declarative models).

Every table name starts with `kernelhub_`, because Optuna's RDB storage may live in the same
database with its own `studies`, `trials`, ... tables.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (BigInteger, CheckConstraint, DateTime, Float, ForeignKey, Integer, String,
                        Text, TypeDecorator, UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# What became of a tuning trial: timed ("complete"), never run ("constraint"), or how it failed
# (kernelhub.tuning.trial.FAILURE_STATES). "failed" and "pruned" are schema version 1's, still valid.
TRIAL_STATES = ("complete", "constraint", "mismatch", "error", "crash", "timeout", "failed", "pruned")


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC datetime on every backend (SQLite keeps no timezone: it stores naive UTC)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value} given to the config database; use a UTC-aware one")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    pass


class Meta(Base):
    """Key/value facts about the database itself; `schema_version` decides migrations."""

    __tablename__ = "kernelhub_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Device(Base):
    """One full device identity (kernelhub.device.DeviceIdentity); rows are shared by many configs."""

    __tablename__ = "kernelhub_devices"
    __table_args__ = (UniqueConstraint("key", "name", "vendor", "compute_capability", "sm_count",
                                       "memory_bytes", "shared_memory_bytes", "cuda_version",
                                       "torch_version", "triton_version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(255))
    vendor: Mapped[str] = mapped_column(String(16))
    compute_capability: Mapped[str | None] = mapped_column(String(16))
    sm_count: Mapped[int | None] = mapped_column(Integer)
    memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    shared_memory_bytes: Mapped[int] = mapped_column(Integer)
    cuda_version: Mapped[str | None] = mapped_column(String(64))
    torch_version: Mapped[str] = mapped_column(String(64))
    triton_version: Mapped[str | None] = mapped_column(String(64))


class BestConfigRow(Base):
    """The fastest known config for one (gpu, family, bucket, dtype, kernel version).

    Rows of other kernel versions are kept: they are stale, shown and pruned explicitly.
    """

    __tablename__ = "kernelhub_best_configs"
    __table_args__ = (UniqueConstraint("gpu_key", "family", "bucket", "dtype", "kernel_version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    gpu_key: Mapped[str] = mapped_column(String(64))
    family: Mapped[str] = mapped_column(String(64))
    bucket: Mapped[str] = mapped_column(String(255))  # "M=128,N=4096,K=4096"
    dtype: Mapped[str] = mapped_column(String(32))  # "bfloat16"
    config: Mapped[str] = mapped_column(Text)  # JSON of dict[str, int]
    median_ms: Mapped[float] = mapped_column(Float)
    p20_ms: Mapped[float] = mapped_column(Float)
    p80_ms: Mapped[float] = mapped_column(Float)
    throughput: Mapped[float | None] = mapped_column(Float)
    throughput_unit: Mapped[str | None] = mapped_column(String(32))  # "TFLOP/s"
    default_median_ms: Mapped[float | None] = mapped_column(Float)
    trials: Mapped[int] = mapped_column(Integer)
    kernel_version: Mapped[str] = mapped_column(String(64))
    triton_version: Mapped[str | None] = mapped_column(String(64))
    torch_version: Mapped[str] = mapped_column(String(64))
    cuda_version: Mapped[str | None] = mapped_column(String(64))
    device_id: Mapped[int | None] = mapped_column(ForeignKey("kernelhub_devices.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    device: Mapped[Device | None] = relationship(lazy="joined")


class TrialRow(Base):
    """One measured tuning trial, kept so studies can be inspected and replayed without a GPU."""

    __tablename__ = "kernelhub_trials"
    __table_args__ = (UniqueConstraint("study", "number"),
                      CheckConstraint(f"state IN ({', '.join(repr(s) for s in TRIAL_STATES)})", name="trial_state"))

    id: Mapped[int] = mapped_column(primary_key=True)
    gpu_key: Mapped[str] = mapped_column(String(64))
    family: Mapped[str] = mapped_column(String(64))
    bucket: Mapped[str] = mapped_column(String(255))
    dtype: Mapped[str] = mapped_column(String(32))
    kernel_version: Mapped[str] = mapped_column(String(64))
    study: Mapped[str] = mapped_column(String(255))
    number: Mapped[int] = mapped_column(Integer)
    config: Mapped[str] = mapped_column(Text)  # JSON of dict[str, int]
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    median_ms: Mapped[float | None] = mapped_column(Float)
    p20_ms: Mapped[float | None] = mapped_column(Float)
    p80_ms: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
