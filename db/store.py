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

Bulk writes (`save_many`, which `kernelhub import` uses) hold that lock briefly: every value is
checked before the transaction starts, device ids are resolved once per distinct identity, and
the rows go in as one `INSERT ... ON CONFLICT DO UPDATE` executemany. Measured on the 2-core CPU
VM: a 60,000-entry import holds the SQLite write lock for about 1 s (0.7 to 1.1 s; as one query per
entry it held it 42 s, past the 30 s busy timeout of a tuner waiting for it):
`KERNELHUB_MEASURE_IMPORT=60000 python -m pytest tests/test_db.py -k bulk -s` prints it.

Reading survives any row: values are read raw and checked against their column's rule
(`kernelhub.db.fields`); a row that breaks one (hand-edited, corrupt: text in a timing column, a
config that is not JSON, a NULL) comes back marked `invalid` with the reason, and the other rows
are unaffected. Readers that use configs never see invalid rows; `kernelhub show` and `prune` ask
for them.

Every database problem leaves as a `ConfigDBError` that names the database and says what to do.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import (Connection, Table, and_, create_engine, delete, event, inspect, or_, select, type_coerce,
                        update)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import NullType

from kernelhub.db.fields import brief, rule
from kernelhub.db.models import TRIAL_STATES, Base, BestConfigRow, Device, Meta, TrialRow
from kernelhub.device import DeviceIdentity
from kernelhub.errors import ConfigDBError

SCHEMA_VERSION = 2
DB_ENV = "KERNELHUB_DB"
# kernelhub_meta key of the database's identity: a random id, which its tuning studies carry.
DATABASE_ID_KEY = "database_id"
# Beside a SQLite database `<name>`: its tuning studies, in `<name>.optuna-journal` (tuning/tuner.py),
# and SQLite's own companion files.
STUDY_JOURNAL_SUFFIX = ".optuna-journal"
_SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


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


def _parse_url(url: str) -> URL:
    """`url` parsed; ConfigDBError (with any password hidden) if it is not a SQLAlchemy URL."""
    try:
        return make_url(url)
    except (SQLAlchemyError, ValueError) as exc:  # ValueError: a port that is not a number
        shown = re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)
        raise ConfigDBError(f"{shown!r} is not a database URL ({exc}); set {DB_ENV} (or --db) to a SQLite file "
                            "path or a SQLAlchemy URL such as sqlite:///PATH or postgresql://USER@HOST:PORT/DB"
                            ) from None


def default_url() -> str:
    """The database URL: `$KERNELHUB_DB` if set (a URL, or a plain path to a SQLite file), else
    `sqlite:///<$XDG_CACHE_HOME or ~/.cache>/kernelhub/configs.sqlite`."""
    if os.environ.get(DB_ENV, "").strip():
        return database_url(os.environ[DB_ENV].strip())
    cache = os.environ.get("XDG_CACHE_HOME", "").strip() or Path.home() / ".cache"
    return f"sqlite:///{Path(cache) / 'kernelhub' / 'configs.sqlite'}"


def database_url(url_or_path: str | os.PathLike | None = None) -> str:
    """The URL of the database a user named: a URL as it is, a plain path as a SQLite file; None is `default_url()`."""
    if url_or_path is None:
        return default_url()
    text = os.fspath(url_or_path)
    return text if "://" in text else f"sqlite:///{text}"


def sqlite_path(url: str) -> Path | None:
    """The file behind a SQLite URL; None for other databases and in-memory SQLite.

    ConfigDBError if `url` is not a database URL at all.
    """
    parsed = _parse_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    if parsed.query.get("mode") == "memory":
        return None
    return Path(parsed.database)


def database_where(url: str) -> str:
    """How messages name the database at `url`: its file's absolute path, or its URL without the password."""
    path = sqlite_path(url)
    return os.path.abspath(path) if path is not None else _parse_url(url).render_as_string(hide_password=True)


def study_journal_path(database: Path) -> Path:
    """The Optuna journal holding the tuning studies of the SQLite database file `database`."""
    return database.with_name(database.name + STUDY_JOURNAL_SUFFIX)


def database_files(url: str) -> list[Path]:
    """Every file a SQLite database at `url` consists of (its companions and study journal included),
    also under the name its symlinks resolve to; [] for a server or in-memory database."""
    path = sqlite_path(url)
    if path is None:
        return []
    names = [path.name + suffix for suffix in ("", *_SQLITE_COMPANIONS)]
    files = [p.with_name(name) for p in (path, path.resolve()) for name in names]
    return files + [study_journal_path(p) for p in (path, path.resolve())]


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
    invalid: str | None = None  # on rows read back: why the row breaks its columns' rules (see the module doc)
    stamp: object = field(default=None, repr=False, compare=False)  # created_at as stored (delete_best's guard)


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
    invalid: str | None = None  # as BestConfig.invalid


_NOT_COLUMNS = ("id", "device", "invalid", "stamp")  # record fields that are no column of their table


def _field_rules(cls, table: Table) -> tuple:
    """(field, its column's rule) for every column field of a record class, worked out once."""
    return tuple((f.name, rule(table.c[f.name])) for f in fields(cls) if f.name not in _NOT_COLUMNS)


_RULES = {BestConfig: _field_rules(BestConfig, BestConfigRow.__table__),
          TrialRecord: _field_rules(TrialRecord, TrialRow.__table__)}
_DEVICE_RULES = tuple((name, rule(Device.__table__.c[name])) for name in DEVICE_FIELDS)


def _column_values(record: BestConfig | TrialRecord) -> dict:
    """Column values of a record, each checked by its column's rule (ValueError naming the field);
    its id and device are the caller's."""
    values = {}
    for name, check in _RULES[type(record)]:
        value = getattr(record, name)
        try:
            values[name] = check(json.dumps(value) if name == "config" else value)
        except ValueError as exc:
            raise ValueError(f"{name} is {brief(value)}, {exc}") from None
    return values


def _device_values(identity: Mapping, *, prefix: str = "") -> dict:
    """A device identity's column values (from keys `prefix + field`), checked like `_column_values`."""
    missing = [k for k in DEVICE_FIELDS if prefix + k not in identity]
    if missing:
        raise ValueError(f"device identity lacks {missing}")
    values = {}
    for name, check in _DEVICE_RULES:
        value = identity[prefix + name]
        try:
            values[name] = check(value)
        except ValueError as exc:
            raise ValueError(f"device {name} is {brief(value)}, {exc}") from None
    return values


def _identity(device: Mapping) -> tuple:
    """A device identity as a dictionary key: its values in field order (`repr` of any unhashable one)."""
    values = tuple(device.get(k) for k in DEVICE_FIELDS)
    try:
        hash(values)
    except TypeError:  # a list where a name belongs: _device_values refuses it
        return tuple(map(repr, values))
    return values


def _raw_columns(table: Table, prefix: str = "") -> list:
    """Every column of `table`, as the driver returns it: no type conversion that a bad value could break."""
    return [type_coerce(column, NullType()).label(prefix + column.key) for column in table.columns]


def _parse_config(text: object) -> dict[str, int]:
    """A stored config (JSON text of an object of integers); ValueError saying what is wrong."""
    try:
        config = json.loads(text) if isinstance(text, str) else None
    except (ValueError, RecursionError):
        config = None
    if not isinstance(config, dict) or not all(type(v) is int for v in config.values()):
        raise ValueError("expected JSON text of an object of integers")
    return config


def _record_from_raw(cls, raw: Mapping):
    """A record from one row's raw values; a value that breaks its column's rule is None in the
    record and the first such problem is its `invalid` reason, so a bad row never stops a read."""
    values, problems = {"id": raw["id"]}, []
    for name, check in _RULES[cls]:
        value = raw[name]
        try:
            values[name] = _parse_config(value) if name == "config" else check(value)
        except ValueError as exc:
            values[name] = None
            problems.append(f"{name} is {brief(value)}, {exc}")
    if cls is BestConfig:
        values["stamp"] = raw["created_at"]
        values["device"] = None
        if raw["device__id"] is not None:
            try:
                values["device"] = _device_values(raw, prefix="device__")
            except ValueError as exc:
                problems.append(str(exc))
    if problems:
        values["invalid"] = problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
    return cls(**values)


def _upsert_many(session: Session, table: Table, key: tuple[str, ...], rows: list[dict], *, where=None) -> None:
    """Insert `rows` into `table`, updating the row with the same `key` columns where there is one
    (only where `where(stored, new)` holds, if given): one executemany on SQLite and PostgreSQL."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    if dialect in ("sqlite", "postgresql"):
        insert = (sqlite if dialect == "sqlite" else postgresql).insert(table)
        changed = {name: insert.excluded[name] for name in rows[0] if name not in key}
        statement = insert.on_conflict_do_update(index_elements=[table.c[k] for k in key], set_=changed,
                                                 where=None if where is None else where(table.c, insert.excluded))
        session.execute(statement, rows)
        return
    for row in rows:  # other servers (MySQL, ...): a query per row, still in the caller's one transaction
        match = and_(*(table.c[k] == row[k] for k in key))
        stored = session.execute(select(table.c.id).where(match)).first()
        if stored is None:
            session.execute(table.insert().values(row))
        else:
            condition = match if where is None else and_(match, where(table.c, _Values(row)))
            session.execute(table.update().where(condition).values(row))


class _Values:
    """`row` values in the place of an upsert's `excluded` columns (for the per-row fallback)."""

    def __init__(self, row: dict):
        self._row = row

    def __getattr__(self, name: str):
        return self._row[name]


def _fuller_or_faster(stored, new):
    """Where the stored best config may be replaced by `new` under `unless_outdated` (see save_best);
    a stored row with a NULL count or time is replaced, never kept for it."""
    return or_(stored.trials <= new.trials, stored.median_ms > new.median_ms,
               stored.trials.is_(None), stored.median_ms.is_(None))


class ConfigStore:
    """The config database at `url` (default: `default_url()`), checked and migrated on open.

    `create=False` refuses to create a database that does not exist yet (for read-only users).
    Usable as a context manager; `close()` releases its connections.
    """

    def __init__(self, url: str | os.PathLike | None = None, *, create: bool = True):
        self.url = database_url(url)
        self._ours = False  # set once the schema check passed: only then is the file ours to change
        self._engine = None
        self.path = sqlite_path(self.url)
        self.where = database_where(self.url)  # how messages name the database
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
                    conn.execute(Meta.__table__.insert(), [
                        {"key": "schema_version", "value": str(SCHEMA_VERSION)},
                        {"key": DATABASE_ID_KEY, "value": uuid.uuid4().hex}])
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
        hint = self._file_hint(reason.lower()) or next((h for pattern, h in _HINTS if pattern in reason.lower()),
                                                       _DEFAULT_HINT)
        return f"config database {self.where}: cannot {action}: {reason}; {hint}"

    def _file_hint(self, reason: str) -> str | None:
        """What to do when SQLite cannot open or write the file, naming the directory where that is the cause."""
        if self.path is None or not ("unable to open" in reason or "readonly" in reason):
            return None
        directory = os.path.abspath(self.path.parent)
        if not self.path.exists():
            return f"check that the directory {directory} exists and is writable, or set {DB_ENV} to another path"
        if not os.access(self.path, os.R_OK):
            return f"the file is not readable: fix its permissions, or set {DB_ENV} to another path"
        if "unable to open" in reason or not os.access(directory, os.W_OK):
            # The file is there and readable: what SQLite could not create is a file beside it.
            return (f"the directory {directory} is not writable, and SQLite must create the database's -wal and "
                    f"-shm files in it even to read it: make that directory writable, or set {DB_ENV} to a "
                    "database in a writable directory")
        return None

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
        try:
            values = _device_values(identity)
        except ValueError as exc:
            raise ConfigDBError(f"config database {self.where}: {exc}") from None
        with self._session("record a device", write=True) as session:
            return self._device_id(session, values)

    def _device_id(self, session: Session, values: dict) -> int:
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
        """Save best configs like `save_best`, all in one transaction: all are written or none.

        Every value is checked against its column first (ConfigDBError naming the entry and field,
        nothing written), so the write lock is held only for the writing (see the module docstring).
        """
        rows, identities = [], {}  # identities: each distinct device, checked and looked up once
        for index, entry in enumerate(entries):
            try:
                values = _column_values(entry)
                identity = None if entry.device is None else _identity(entry.device)
                if identity not in identities and entry.device is not None:
                    identities[identity] = _device_values(entry.device)
            except ValueError as exc:
                raise ConfigDBError(f"config database {self.where}: best config {index} not saved, nothing "
                                    f"written: {exc}") from None
            values["device_id"] = identity
            rows.append(values)
        key = ("gpu_key", "family", "bucket", "dtype", "kernel_version")
        with self._session("save best configs", write=True) as session:
            device_ids = {identity: self._device_id(session, device) for identity, device in identities.items()}
            for values in rows:
                values["device_id"] = None if values["device_id"] is None else device_ids[values["device_id"]]
            _upsert_many(session, BestConfigRow.__table__, key, rows,
                         where=_fuller_or_faster if unless_outdated else None)

    def best_configs(self, *, gpu_key: str | None = None, family: str | None = None, bucket: str | None = None,
                     dtype: str | None = None, kernel_version: str | None = None,
                     include_invalid: bool = False) -> list[BestConfig]:
        """Best configs matching every filter given, ordered by (gpu_key, family, dtype, bucket).

        include_invalid: also the rows that break their columns' rules, marked `invalid` (for the
        commands that list or delete them; nothing may launch their configs).
        """
        table = BestConfigRow.__table__
        filters = dict(gpu_key=gpu_key, family=family, bucket=bucket, dtype=dtype, kernel_version=kernel_version)
        query = (select(*_raw_columns(table), *_raw_columns(Device.__table__, "device__"))
                 .select_from(table.outerjoin(Device.__table__))
                 .where(*(table.c[k] == v for k, v in filters.items() if v is not None))
                 .order_by(table.c.gpu_key, table.c.family, table.c.dtype, table.c.bucket, table.c.id))
        with self._session("read best configs") as session:
            rows = [_record_from_raw(BestConfig, raw) for raw in session.execute(query).mappings()]
        return rows if include_invalid else [row for row in rows if row.invalid is None]

    def delete_best(self, rows: Iterable[BestConfig]) -> int:
        """Delete best configs read from this store, all in one transaction; returns how many went.

        A row that changed since it was read (tuned again: another `created_at`) or is already
        gone is left alone, so a prune that races a tuner never deletes the tuner's fresh result.
        The stored `created_at` is compared as stored, so invalid rows can be deleted too.
        """
        rows = list(rows)
        if any(row.id is None for row in rows):
            raise ValueError("delete_best takes rows read from the store (with their id)")
        stored_at = type_coerce(BestConfigRow.created_at, NullType())
        with self._session("delete best configs", write=True) as session:
            return sum(session.execute(delete(BestConfigRow).where(BestConfigRow.id == row.id,
                                                                   stored_at == row.stamp)).rowcount
                       for row in rows)

    def add_trial(self, rec: TrialRecord) -> None:
        """Record one trial; adding (study, number) again replaces it."""
        try:
            values = _column_values(rec)
        except ValueError as exc:
            raise ConfigDBError(f"config database {self.where}: trial not recorded: {exc}") from None
        with self._session("record a trial", write=True) as session:
            _upsert_many(session, TrialRow.__table__, ("study", "number"), [values])

    def trials(self, *, gpu_key: str | None = None, family: str | None = None, bucket: str | None = None,
               dtype: str | None = None, study: str | None = None,
               include_invalid: bool = False) -> list[TrialRecord]:
        """Trials matching every filter given, ordered by (study, number); include_invalid as in best_configs."""
        table = TrialRow.__table__
        filters = dict(gpu_key=gpu_key, family=family, bucket=bucket, dtype=dtype, study=study)
        query = (select(*_raw_columns(table)).where(*(table.c[k] == v for k, v in filters.items() if v is not None))
                 .order_by(table.c.study, table.c.number, table.c.id))
        with self._session("read trials") as session:
            rows = [_record_from_raw(TrialRecord, raw) for raw in session.execute(query).mappings()]
        return rows if include_invalid else [row for row in rows if row.invalid is None]

    def archive_trials(self, study: str, *, before: datetime) -> int:
        """Rename the trials of `study` recorded before `before` to `<study>@<before>`; returns how many.

        The tuner calls this when it starts `study` afresh while the database still holds trials of
        an earlier study of that name (its journal moved away): the new trials reuse the numbers,
        and would otherwise replace the old rows instead of standing beside them.
        """
        archived = f"{study}@{before.astimezone(timezone.utc):%Y-%m-%dT%H:%M:%S.%fZ}"
        with self._session("archive earlier trials", write=True) as session:
            return session.execute(update(TrialRow).where(TrialRow.study == study, TrialRow.created_at < before)
                                   .values(study=archived)).rowcount

    def database_id(self) -> str:
        """This database's identity: a random id kept in its meta table, made on first need by a
        database created before kernelhub kept one. Its tuning studies carry it (tuning/tuner.py)."""
        query = select(Meta.value).where(Meta.key == DATABASE_ID_KEY)
        with self._session("read its id") as session:
            value = session.scalar(query)
        if value is None:
            with self._session("record its id", write=True) as session:
                value = session.scalar(query)  # again, under the write lock: another process may have won
                if value is None:
                    value = uuid.uuid4().hex
                    session.add(Meta(key=DATABASE_ID_KEY, value=value))
        return value

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
