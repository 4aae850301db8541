"""The config store: open (create, check, migrate) the database, save and read tuned configs and trials.

SQLite is the default and the one that matters most: one file per machine, shared by the tuner
processes and every program that calls `kernelhub.ops`. Concurrency rests on three settings:
WAL (readers never wait for a writer), a 30 s busy timeout (writers queue instead of failing),
and `BEGIN IMMEDIATE` for write transactions, because a deferred transaction that reads first and
writes later fails at once with "database is locked" when another writer got in between, without
waiting for the busy timeout.

PostgreSQL shares one database between the tuner processes of many machines. Its row locks do
not cover what our writes do (read, then insert if absent: two writers would both insert, and
get-or-create of a device with NULL columns would make duplicates, since NULLs never collide in a
unique constraint), so every write transaction first takes one transaction-scoped advisory lock:
kernelhub's writers queue, as they do on SQLite, and give up after the same 30 s. Writes are
small (one per trial), so a single lock costs nothing that matters.

Every database problem leaves as a `ConfigDBError` that names the database and says what to do.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import Connection, create_engine, delete, event, inspect, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from kernelhub.db.models import TRIAL_STATES, Base, BestConfigRow, Device, Meta, TrialRow
from kernelhub.device import DeviceIdentity
from kernelhub.errors import ConfigDBError

SCHEMA_VERSION = 2
DB_ENV = "KERNELHUB_DB"



def _widen_trial_states(conn: Connection) -> None:
    """Schema 1 -> 2: a trial's state says how it failed (mismatch, error, crash, timeout, constraint).

    Only the trials table's CHECK constraint changes; every row is kept as it was.
    """
    check = f"CONSTRAINT trial_state CHECK (state IN ({', '.join(repr(s) for s in TRIAL_STATES)}))"
    if conn.dialect.name != "sqlite":
        conn.exec_driver_sql("ALTER TABLE kernelhub_trials DROP CONSTRAINT trial_state")
        conn.exec_driver_sql(f"ALTER TABLE kernelhub_trials ADD {check}")
        return
    # SQLite cannot alter a constraint: copy the rows into a table made from the old one's own
    # definition with the new constraint (https://www.sqlite.org/lang_altertable.html#otheralter).
    old = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'kernelhub_trials'")
    new, found = re.subn(r"CONSTRAINT trial_state CHECK \(.*\)", lambda _: check, old.scalar_one())
    if found != 1:
        raise ConfigDBError("cannot migrate the trials table from schema version 1: its definition is not "
                            "the one kernelhub wrote; nothing was changed")
    conn.exec_driver_sql(new.replace("CREATE TABLE kernelhub_trials", "CREATE TABLE kernelhub_trials_v2", 1))
    conn.exec_driver_sql("INSERT INTO kernelhub_trials_v2 SELECT * FROM kernelhub_trials")
    conn.exec_driver_sql("DROP TABLE kernelhub_trials")
    conn.exec_driver_sql("ALTER TABLE kernelhub_trials_v2 RENAME TO kernelhub_trials")


# MIGRATIONS[v](connection) turns schema version v into v + 1; all steps run in one transaction.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {1: _widen_trial_states}

DEVICE_FIELDS = tuple(f.name for f in fields(DeviceIdentity))

# Tables Optuna's RDB storage creates: a database holding only these may also become ours.
_OPTUNA_TABLES = frozenset({
    "alembic_version", "version_info", "studies", "study_directions", "study_system_attributes",
    "study_user_attributes", "trials", "trial_heartbeats", "trial_intermediate_values",
    "trial_params", "trial_system_attributes", "trial_user_attributes", "trial_values",
})

_BUSY_TIMEOUT_S = 30
# Key of the PostgreSQL advisory lock that write transactions take (any constant kernelhub owns).
_POSTGRES_WRITE_LOCK = 0x6B65726E656C6875  # "kernelhu"

# (substring of the driver's message, what the user should do): the first match is used.
_HINTS = (
    ("file is not a database", "it is not a SQLite database (left untouched): move it away or set "
                               f"{DB_ENV} to another path"),
    ("locked", f"another process held it locked for {_BUSY_TIMEOUT_S} s: retry when that process is done"),
    ("busy", f"another process held it locked for {_BUSY_TIMEOUT_S} s: retry when that process is done"),
    ("lock timeout", f"another process held it locked for {_BUSY_TIMEOUT_S} s: retry when that process is done"),
    ("disk is full", "its disk (or this process's file size limit) is full: free space and retry; "
                     "the transaction was rolled back, the database is as it was"),
    ("disk i/o error", "the disk failed or filled up while writing: check it and retry; the transaction "
                       "was rolled back"),
    ("readonly", f"it is read-only: fix its permissions or set {DB_ENV} to a writable path"),
    ("unable to open", f"check that its directory exists and is writable, or set {DB_ENV} to another path"),
    ("permission denied", f"check the permissions, or set {DB_ENV} to a writable path"),
    ("errno", f"check that the directory can be created, or set {DB_ENV} to another path"),
    ("password authentication failed", f"check the user and password in {DB_ENV}"),
    ('role "', f"check the user name in {DB_ENV}, or create that role on the server"),
    ('database "', "create that database on the server first (README: Sharing results across machines)"),
    ("connect", "check that the database server is running and reachable at that host and port"),
    ("no module named", "install that database's Python driver (PostgreSQL: pip install 'kernelhub[postgres]'), "
                        f"or set {DB_ENV} to another database"),
    ("can't load plugin", f"use a SQLite file path or a SQLAlchemy URL (sqlite:///..., postgresql://...) "
                          f"in {DB_ENV}"),
)
_DEFAULT_HINT = f"check the database, or set {DB_ENV} to another one"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def default_url() -> str:
    """The database URL: `$KERNELHUB_DB` if set (a URL, or a plain path to a SQLite file), else
    `sqlite:///<$XDG_CACHE_HOME or ~/.cache>/kernelhub/configs.sqlite`."""
    if os.environ.get(DB_ENV, "").strip():
        return _as_url(os.environ[DB_ENV].strip())
    cache = os.environ.get("XDG_CACHE_HOME", "").strip() or Path.home() / ".cache"
    return f"sqlite:///{Path(cache) / 'kernelhub' / 'configs.sqlite'}"


def _as_url(url_or_path: str | os.PathLike) -> str:
    text = os.fspath(url_or_path)
    return text if "://" in text else f"sqlite:///{text}"


def sqlite_path(url: str) -> Path | None:
    """The file behind a SQLite URL; None for other databases and in-memory SQLite."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    if parsed.query.get("mode") == "memory":
        return None
    return Path(parsed.database)


@dataclass(kw_only=True)
class BestConfig:
    """The fastest known config for (gpu_key, family, bucket, dtype, kernel_version), with its timing.

    `device` is the full DeviceIdentity as a dict (None when unknown); `id` is set on rows read back.
    """

    gpu_key: str
    family: str
    bucket: str  # "M=128,N=4096,K=4096"
    dtype: str  # "bfloat16"
    config: dict[str, int]
    median_ms: float
    p20_ms: float
    p80_ms: float
    trials: int
    kernel_version: str
    torch_version: str
    triton_version: str | None
    cuda_version: str | None = None
    throughput: float | None = None
    throughput_unit: str | None = None  # "TFLOP/s"
    default_median_ms: float | None = None  # the DEFAULT config's median, for the speedup
    device: dict | None = None
    created_at: datetime = field(default_factory=_now)
    id: int | None = None


@dataclass(kw_only=True)
class TrialRecord:
    """One tuning trial; (study, number) identifies it. `state`: one of `models.TRIAL_STATES`."""

    gpu_key: str
    family: str
    bucket: str
    dtype: str
    kernel_version: str
    study: str
    number: int
    config: dict[str, int]
    state: str
    reason: str | None = None  # why it failed (or was never run: "constraint")
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    created_at: datetime = field(default_factory=_now)
    id: int | None = None


def _row_values(record: BestConfig | TrialRecord) -> dict:
    """Column values of a record (its id and device are handled by the caller)."""
    values = {f.name: getattr(record, f.name) for f in fields(record) if f.name not in ("id", "device")}
    values["config"] = json.dumps(record.config)
    return values


def _from_row(cls, row: BestConfigRow | TrialRow):
    values = {f.name: getattr(row, f.name) for f in fields(cls) if f.name != "device"}
    values["config"] = json.loads(row.config)
    if cls is BestConfig:
        values["device"] = None if row.device is None else {k: getattr(row.device, k) for k in DEVICE_FIELDS}
    return cls(**values)


def _upsert(session: Session, model, key: dict, values: dict):
    """Update the row of `model` with `key`, or insert one; returns the row."""
    row = session.scalars(select(model).filter_by(**key)).one_or_none()
    if row is None:
        row = model(**key, **values)
        session.add(row)
    else:
        for name, value in values.items():
            setattr(row, name, value)
    return row


class ConfigStore:
    """The config database at `url` (default: `default_url()`), checked and migrated on open.

    `create=False` refuses to create a database that does not exist yet (for read-only users).
    Usable as a context manager; `close()` releases its connections.
    """

    def __init__(self, url: str | os.PathLike | None = None, *, create: bool = True):
        self.url = _as_url(url) if url is not None else default_url()
        self._ours = False  # set once the schema check passed: only then is the file ours to change
        self._engine = None
        self.where = self.url  # how messages name the database: its absolute path, or its URL sans password
        try:
            self.path = sqlite_path(self.url)
        except SQLAlchemyError as exc:
            raise ConfigDBError(f"{self.url!r} is not a database URL ({exc}); set {DB_ENV} to a SQLite "
                                f"file path or a SQLAlchemy URL") from exc
        self.where = (os.path.abspath(self.path) if self.path
                      else make_url(self.url).render_as_string(hide_password=True))
        if self.path is not None:
            if self.path.is_dir():
                raise ConfigDBError(f"config database {self.where} is a directory, not a file; "
                                    f"set {DB_ENV} to a file path")
            if not create and not self.path.exists():
                raise ConfigDBError(f"no kernelhub database at {self.where}; tune first "
                                    f"(`kernelhub tune`) or set {DB_ENV} to an existing one")
            if create:
                with self._guard("create its directory"):
                    self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._engine = self._open_engine()
        except (SQLAlchemyError, ImportError) as exc:  # ImportError: the URL's driver is not installed
            raise ConfigDBError(self._describe("open it", exc)) from exc
        # Write transactions go through this engine: same pool, but BEGIN IMMEDIATE (see _on_begin).
        self._write_engine = self._engine.execution_options(kernelhub_write=True)
        try:
            self._check_schema(create)
        except BaseException:
            self.close()
            raise

    # -- opening -----------------------------------------------------------------------------------

    def _open_engine(self):
        backend = make_url(self.url).get_backend_name()
        if backend == "postgresql":
            return self._open_postgres_engine()
        if backend != "sqlite":
            return create_engine(self.url, pool_pre_ping=True)
        if self.path is None:
            # One shared connection, or each thread would see its own empty in-memory database.
            engine = create_engine(self.url, poolclass=StaticPool,
                                   connect_args={"check_same_thread": False, "timeout": _BUSY_TIMEOUT_S})
        else:
            engine = create_engine(self.url, connect_args={"timeout": _BUSY_TIMEOUT_S})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection, _record):
            dbapi_connection.isolation_level = None  # sqlite3 must not BEGIN on its own: _on_begin does
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA busy_timeout={int(_BUSY_TIMEOUT_S * 1000)}")
            cursor.execute("PRAGMA foreign_keys=ON")
            if self._ours:  # switching to WAL rewrites the header: never on a file that is not ours
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(connection):
            immediate = connection.get_execution_options().get("kernelhub_write")
            connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine

    def _open_postgres_engine(self):
        engine = create_engine(self.url, pool_pre_ping=True)

        @event.listens_for(engine, "begin")
        def _on_begin(connection):
            if connection.get_execution_options().get("kernelhub_write"):
                # lock_timeout bounds the wait for the advisory lock too: an error after 30 s, not a hang.
                connection.exec_driver_sql(f"SET LOCAL lock_timeout = '{_BUSY_TIMEOUT_S}s'")
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_POSTGRES_WRITE_LOCK})")

        return engine

    def _check_schema(self, create: bool) -> None:
        """Create an empty database, accept a current one, migrate an older one, refuse anything else."""
        with self._guard("read its schema"), self._engine.connect() as conn, conn.begin():
            version = self._schema_version(conn)
        if version is None and not create:
            raise ConfigDBError(f"no kernelhub database at {self.where} (it has no kernelhub tables); tune first "
                                f"(`kernelhub tune`) or set {DB_ENV} to an existing one")
        if version != SCHEMA_VERSION:
            with self._guard("create or migrate its schema"), self._write_engine.connect() as conn, conn.begin():
                version = self._schema_version(conn)  # again, under the write lock: another process may have won
                if version is None:
                    Base.metadata.create_all(conn)
                    conn.execute(Meta.__table__.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
                elif version < SCHEMA_VERSION:
                    self._migrate(conn, version)
        self._ours = True
        if self._engine.dialect.name == "sqlite":
            # WAL is a property of the file, so this also covers connections already in the pool.
            # Raw DBAPI connection: SQLAlchemy would wrap the PRAGMA in a transaction, where it fails.
            with self._guard("switch it to WAL mode"):
                raw = self._engine.raw_connection()
                try:
                    raw.driver_connection.execute("PRAGMA journal_mode=WAL")
                finally:
                    raw.close()

    def _schema_version(self, conn: Connection) -> int | None:
        """The stored schema version; None for a database with no tables (or only Optuna's)."""
        tables = set(inspect(conn).get_table_names())
        if Meta.__tablename__ not in tables:
            foreign = sorted(tables - _OPTUNA_TABLES)
            if foreign:
                raise ConfigDBError(f"{self.where} is not a kernelhub config database (it has tables "
                                    f"{foreign[:5]} and no {Meta.__tablename__}); left untouched: "
                                    f"set {DB_ENV} to another path")
            return None
        text = conn.scalar(select(Meta.value).where(Meta.key == "schema_version"))
        if text is None or not text.isdigit():
            raise ConfigDBError(f"{self.where} is not a kernelhub config database (no schema_version "
                                f"in {Meta.__tablename__}); left untouched: set {DB_ENV} to another path")
        version = int(text)
        if version > SCHEMA_VERSION:
            raise ConfigDBError(f"config database {self.where} has schema version {version}, written by a "
                                f"newer kernelhub (this one reads {SCHEMA_VERSION}): upgrade kernelhub, "
                                f"or set {DB_ENV} to another database")
        return version

    def _migrate(self, conn: Connection, version: int) -> None:
        for v in range(version, SCHEMA_VERSION):
            if v not in MIGRATIONS:
                raise ConfigDBError(f"config database {self.where}: no migration from schema version {v} "
                                    f"to {v + 1}; this kernelhub install is broken, reinstall it")
            MIGRATIONS[v](conn)
        conn.execute(Meta.__table__.update().where(Meta.key == "schema_version")
                     .values(value=str(SCHEMA_VERSION)))

    # -- errors and sessions -----------------------------------------------------------------------

    def _describe(self, action: str, exc: BaseException) -> str:
        reason = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0]
        hint = next((h for pattern, h in _HINTS if pattern in reason.lower()), _DEFAULT_HINT)
        return f"config database {self.where}: cannot {action}: {reason}; {hint}"

    @contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        """Turn driver and file-system errors raised inside into ConfigDBError."""
        try:
            yield
        except (SQLAlchemyError, OSError, sqlite3.Error) as exc:
            raise ConfigDBError(self._describe(action, exc)) from exc

    @contextmanager
    def _session(self, action: str, *, write: bool = False) -> Iterator[Session]:
        """A session in one transaction, committed at the end; write=True takes the write lock first."""
        with self._guard(action), Session(self._write_engine if write else self._engine,
                                          expire_on_commit=False) as session, session.begin():
            yield session

    # -- public API --------------------------------------------------------------------------------

    def record_device(self, identity: Mapping) -> int:
        """Get or create the row of a device identity (DeviceIdentity.to_dict()); returns its id."""
        with self._session("record a device", write=True) as session:
            return self._device_id(session, identity)

    def _device_id(self, session: Session, identity: Mapping) -> int:
        missing = [k for k in DEVICE_FIELDS if k not in identity]
        if missing:
            raise ConfigDBError(f"config database {self.where}: device identity lacks {missing}")
        values = {k: identity[k] for k in DEVICE_FIELDS}
        row = session.scalars(select(Device).filter_by(**values)).first()  # filter_by(x=None) is IS NULL
        if row is None:
            row = Device(**values)
            session.add(row)
            session.flush()
        return row.id

    def save_best(self, entry: BestConfig, *, unless_outdated: bool = False) -> None:
        """Save one best config, replacing the row with the same (gpu, family, bucket, dtype, kernel version).

        unless_outdated: keep the stored row instead when it already covers more trials and is at
        least as fast (several tuner processes share a study: one that read the study earlier must
        not overwrite a later, fuller result).
        """
        self.save_many([entry], unless_outdated=unless_outdated)

    def save_many(self, entries: Iterable[BestConfig], *, unless_outdated: bool = False) -> None:
        """Save best configs like `save_best`, all in one transaction: all are written or none."""
        with self._session("save best configs", write=True) as session:
            for entry in entries:
                values = _row_values(entry)
                key = {k: values.pop(k) for k in ("gpu_key", "family", "bucket", "dtype", "kernel_version")}
                if unless_outdated:
                    stored = session.scalars(select(BestConfigRow).filter_by(**key)).first()
                    if stored is not None and stored.trials > entry.trials and stored.median_ms <= entry.median_ms:
                        continue
                values["device_id"] = None if entry.device is None else self._device_id(session, entry.device)
                _upsert(session, BestConfigRow, key, values)

    def best_configs(self, *, gpu_key: str | None = None, family: str | None = None, bucket: str | None = None,
                     dtype: str | None = None, kernel_version: str | None = None) -> list[BestConfig]:
        """Best configs matching every filter given, ordered by (gpu_key, family, dtype, bucket)."""
        filters = dict(gpu_key=gpu_key, family=family, bucket=bucket, dtype=dtype, kernel_version=kernel_version)
        query = (select(BestConfigRow).filter_by(**{k: v for k, v in filters.items() if v is not None})
                 .order_by(BestConfigRow.gpu_key, BestConfigRow.family, BestConfigRow.dtype, BestConfigRow.bucket))
        with self._session("read best configs") as session:
            return [_from_row(BestConfig, row) for row in session.scalars(query)]

    def delete_best(self, rows: Iterable[BestConfig]) -> int:
        """Delete best configs read from this store, all in one transaction; returns how many went.

        A row that changed since it was read (tuned again: another `created_at`) or is already
        gone is left alone, so a prune that races a tuner never deletes the tuner's fresh result.
        """
        rows = list(rows)
        if any(row.id is None for row in rows):
            raise ValueError("delete_best takes rows read from the store (with their id)")
        with self._session("delete best configs", write=True) as session:
            return sum(session.execute(delete(BestConfigRow).where(BestConfigRow.id == row.id,
                                                                   BestConfigRow.created_at == row.created_at)
                                       ).rowcount for row in rows)

    def add_trial(self, rec: TrialRecord) -> None:
        """Record one trial; adding (study, number) again replaces it."""
        values = _row_values(rec)
        key = {"study": values.pop("study"), "number": values.pop("number")}
        with self._session("record a trial", write=True) as session:
            _upsert(session, TrialRow, key, values)

    def trials(self, *, gpu_key: str | None = None, family: str | None = None, bucket: str | None = None,
               dtype: str | None = None, study: str | None = None) -> list[TrialRecord]:
        """Trials matching every filter given, ordered by (study, number)."""
        filters = dict(gpu_key=gpu_key, family=family, bucket=bucket, dtype=dtype, study=study)
        query = (select(TrialRow).filter_by(**{k: v for k, v in filters.items() if v is not None})
                 .order_by(TrialRow.study, TrialRow.number))
        with self._session("read trials") as session:
            return [_from_row(TrialRecord, row) for row in session.scalars(query)]

    def close(self) -> None:
        """Release every connection (safe to call twice)."""
        if self._engine is not None:
            self._engine.dispose()

    def __enter__(self) -> ConfigStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ConfigStore({self.where!r})"
