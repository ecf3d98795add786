"""DuckDB store for audits, conditions, per-image predictions, results, findings and reviews.

The file carries its schema version in the `meta` table. A file written by an older version is
migrated forward when it is opened; a newer one is rejected with a message that says so.
Each condition is written in one transaction together with its predictions and results, so an
interrupted audit keeps every condition that finished and a resumed audit skips them.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Self

import numpy as np

SCHEMA_VERSION = 2


class StoreError(ValueError):
    """A store that cannot be opened or an audit id that is not in it."""


@dataclass
class Condition:
    """One evaluated situation: clean, a shift at a severity, a subgroup, a site, and so on."""

    key: str
    kind: str
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    n: int = 0
    effective_n: float | None = None
    too_small: bool = False

    @property
    def severity(self) -> int | None:
        return self.params.get("severity")


@dataclass
class ResultRow:
    metric: str
    value: float
    low: float | None = None
    high: float | None = None
    params: dict[str, Any] = field(default_factory=dict)
    class_name: str | None = None
    reason: str | None = None


@dataclass
class DifferenceRow:
    metric: str
    reference: str
    delta: float
    low: float | None
    high: float | None
    p_value: float | None
    paired: bool
    reference_value: float | None = None
    condition_value: float | None = None


# Each entry upgrades a file from the version before it. Version 1 had no reviews table and no
# artifacts table.
_SCHEMA_V1 = [
    """CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS audits (
        audit_id VARCHAR PRIMARY KEY, created_at TIMESTAMP, finished_at TIMESTAMP,
        kind VARCHAR, status VARCHAR, spec JSON, plan JSON, meta JSON)""",
    """CREATE TABLE IF NOT EXISTS conditions (
        audit_id VARCHAR, key VARCHAR, kind VARCHAR, name VARCHAR, params JSON, n INTEGER,
        effective_n DOUBLE, too_small BOOLEAN, finished_at TIMESTAMP,
        PRIMARY KEY (audit_id, key))""",
    """CREATE TABLE IF NOT EXISTS predictions (
        audit_id VARCHAR, condition VARCHAR, row_index INTEGER, image_id VARCHAR,
        label INTEGER, probs DOUBLE[], weight DOUBLE)""",
    """CREATE TABLE IF NOT EXISTS results (
        audit_id VARCHAR, condition VARCHAR, metric VARCHAR, params JSON, class_name VARCHAR,
        value DOUBLE, low DOUBLE, high DOUBLE, reason VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS differences (
        audit_id VARCHAR, condition VARCHAR, metric VARCHAR, reference VARCHAR,
        delta DOUBLE, low DOUBLE, high DOUBLE, p_value DOUBLE, paired BOOLEAN,
        reference_value DOUBLE, condition_value DOUBLE)""",
    """CREATE TABLE IF NOT EXISTS findings (
        audit_id VARCHAR, finding_id VARCHAR, kind VARCHAR, condition VARCHAR, metric VARCHAR,
        effect DOUBLE, low DOUBLE, high DOUBLE, p_value DOUBLE, q_value DOUBLE, light VARCHAR,
        summary VARCHAR, evidence JSON)""",
]
_MIGRATIONS = {
    2: [
        """CREATE TABLE IF NOT EXISTS reviews (
            review_id VARCHAR PRIMARY KEY, audit_id VARCHAR, created_at TIMESTAMP,
            reviewer VARCHAR, verdict VARCHAR, finding_id VARCHAR, comment VARCHAR)""",
        """CREATE TABLE IF NOT EXISTS artifacts (
            audit_id VARCHAR, name VARCHAR, value JSON, PRIMARY KEY (audit_id, name))""",
    ],
}
_AUDIT_TABLES = ["predictions", "results", "differences", "findings", "conditions", "artifacts",
                 "reviews"]


def resolve_store_path(option: str | Path | None) -> Path:
    """Return the store file: the given path, else $CLINAUDIT_STORE, else ./clinaudit.duckdb."""
    import os

    if option is not None:
        return Path(option)
    return Path(os.environ.get("CLINAUDIT_STORE", "clinaudit.duckdb"))


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def new_audit_id() -> str:
    """Return a fresh audit id: the UTC creation time and six random hex digits."""
    return f"{_now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def _json(value: Any) -> str:
    return json.dumps(value, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot store a {type(value).__name__} as JSON")


def _float_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value


class Store:
    """A DuckDB file holding every audit."""

    def __init__(self, path: str | Path, read_only: bool = False):
        import duckdb

        self.path = Path(path)
        if read_only and not self.path.exists():
            raise StoreError(f"{self.path}: store not found")
        try:
            self.con = duckdb.connect(str(self.path), read_only=read_only)
        except duckdb.Error as error:
            raise StoreError(f"{self.path}: cannot open store ({error})") from None
        if not read_only:
            self._migrate()

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # schema

    def schema_version(self) -> int:
        tables = {row[0] for row in self.con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if "meta" not in tables:
            return 0
        row = self.con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(row[0]) if row else 0

    def _migrate(self) -> None:
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: store has schema version {version}, newer than this clinaudit "
                f"({SCHEMA_VERSION}); upgrade clinaudit to open it"
            )
        if version == SCHEMA_VERSION:
            return
        self.con.execute("BEGIN TRANSACTION")
        if version == 0:
            for statement in _SCHEMA_V1:
                self.con.execute(statement)
            version = 1
        for target in range(version + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[target]:
                self.con.execute(statement)
        self.con.execute(
            "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)]
        )
        self.con.execute("COMMIT")

    # audits

    def create_audit(self, kind: str, spec: dict | None, plan: dict | None, meta: dict | None = None,
                     audit_id: str | None = None) -> str:
        """Insert a new audit with status "running" and return its id."""
        audit_id = audit_id or new_audit_id()
        self.con.execute(
            "INSERT INTO audits VALUES (?, ?, NULL, ?, 'running', ?, ?, ?)",
            [audit_id, _now(), kind, _json(spec), _json(plan), _json(meta or {})],
        )
        return audit_id

    def update_audit(self, audit_id: str, *, status: str | None = None, plan: dict | None = None,
                     meta: dict | None = None) -> None:
        self.require_audit(audit_id)
        if status is not None:
            finished = _now() if status in ("finished", "failed") else None
            self.con.execute(
                "UPDATE audits SET status = ?, finished_at = ? WHERE audit_id = ?",
                [status, finished, audit_id],
            )
        if plan is not None:
            self.con.execute("UPDATE audits SET plan = ? WHERE audit_id = ?", [_json(plan), audit_id])
        if meta is not None:
            merged = {**self.audit(audit_id)["meta"], **meta}
            self.con.execute("UPDATE audits SET meta = ? WHERE audit_id = ?", [_json(merged), audit_id])

    def has_audit(self, audit_id: str) -> bool:
        row = self.con.execute("SELECT 1 FROM audits WHERE audit_id = ?", [audit_id]).fetchone()
        return row is not None

    def require_audit(self, audit_id: str) -> None:
        if not self.has_audit(audit_id):
            raise StoreError(f"audit {audit_id} not found in {self.path}; `clinaudit runs` lists them")

    @contextmanager
    def status_on_error(self, audit_id: str) -> Iterator[None]:
        """Mark the audit "failed" (or "interrupted" on Ctrl-C) when the block raises, then re-raise.

        Without this an audit that stopped half-way would stay "running", and its partial
        results could be read as if it had finished.
        """
        try:
            yield
        except BaseException as error:
            interrupted = isinstance(error, KeyboardInterrupt)
            status = "interrupted" if interrupted else "failed"
            message = ("stopped by Ctrl-C" if interrupted
                       else f"{type(error).__name__}: {error}".splitlines()[0][:500])
            self.update_audit(audit_id, status=status, meta={"error": message})
            raise

    def require_finished(self, audit_id: str) -> None:
        """Raise StoreError unless the audit finished, so partial results are never read as whole."""
        audit = self.audit(audit_id)
        status = audit["status"]
        if status == "finished":
            return
        state = {"running": "is still running or stopped without finishing",
                 "failed": "failed", "interrupted": "was interrupted"}.get(status, f"is {status}")
        error = audit["meta"].get("error")
        raise StoreError(f"audit {audit_id} {state}" + (f" ({error})" if error else "")
                         + "; its results are incomplete, so it has no verdict. Run the audit "
                         f"again, or resume a chat audit with `clinaudit chat --resume {audit_id}`")

    def audit(self, audit_id: str) -> dict[str, Any]:
        self.require_audit(audit_id)
        row = self.con.execute(
            "SELECT audit_id, created_at, finished_at, kind, status, spec, plan, meta "
            "FROM audits WHERE audit_id = ?", [audit_id]
        ).fetchone()
        return {
            "id": row[0], "created_at": row[1], "finished_at": row[2], "kind": row[3],
            "status": row[4], "spec": json.loads(row[5]) if row[5] else None,
            "plan": json.loads(row[6]) if row[6] else None,
            "meta": json.loads(row[7]) if row[7] else {},
        }

    def list_audits(self) -> list[dict[str, Any]]:
        rows = self.con.execute(
            "SELECT a.audit_id, a.created_at, a.kind, a.status, a.meta, "
            "(SELECT count(*) FROM conditions c WHERE c.audit_id = a.audit_id), "
            "(SELECT count(*) FROM findings f WHERE f.audit_id = a.audit_id) "
            "FROM audits a ORDER BY a.created_at"
        ).fetchall()
        return [
            {"id": r[0], "created_at": r[1], "kind": r[2], "status": r[3],
             "meta": json.loads(r[4]) if r[4] else {}, "conditions": r[5], "findings": r[6]}
            for r in rows
        ]

    def delete_audit(self, audit_id: str) -> None:
        """Remove an audit and everything stored under it, in one transaction."""
        self.require_audit(audit_id)
        self.con.execute("BEGIN TRANSACTION")
        for table in _AUDIT_TABLES:
            self.con.execute(f"DELETE FROM {table} WHERE audit_id = ?", [audit_id])
        self.con.execute("DELETE FROM audits WHERE audit_id = ?", [audit_id])
        self.con.execute("COMMIT")

    # conditions

    def finished_conditions(self, audit_id: str) -> set[str]:
        rows = self.con.execute("SELECT key FROM conditions WHERE audit_id = ?", [audit_id]).fetchall()
        return {r[0] for r in rows}

    def save_condition(
        self,
        audit_id: str,
        condition: Condition,
        ids: list[str] | None,
        labels: np.ndarray | None,
        probs: np.ndarray | None,
        results: list[ResultRow],
        differences: list[DifferenceRow] = (),
        weights: np.ndarray | None = None,
    ) -> None:
        """Write a finished condition with its predictions, results and differences atomically."""
        import pandas as pd

        self.con.execute("BEGIN TRANSACTION")
        try:
            for table in ("conditions", "predictions", "results", "differences"):
                column = "key" if table == "conditions" else "condition"
                self.con.execute(f"DELETE FROM {table} WHERE audit_id = ? AND {column} = ?",
                                 [audit_id, condition.key])
            self.con.execute(
                "INSERT INTO conditions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [audit_id, condition.key, condition.kind, condition.name, _json(condition.params),
                 condition.n, _float_or_none(condition.effective_n), condition.too_small, _now()],
            )
            if probs is not None:
                n = len(probs)
                frame = pd.DataFrame({
                    "audit_id": audit_id,
                    "condition": condition.key,
                    "row_index": np.arange(n, dtype=np.int32),
                    "image_id": list(ids) if ids is not None else [None] * n,
                    "label": np.asarray(labels, dtype=np.int32),
                    "probs": list(np.asarray(probs, dtype=np.float64)),
                    "weight": np.ones(n) if weights is None else np.asarray(weights, dtype=float),
                })
                self.con.register("_new_predictions", frame)
                self.con.execute("INSERT INTO predictions SELECT * FROM _new_predictions")
                self.con.unregister("_new_predictions")
            if results:
                self.con.executemany(
                    "INSERT INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [[audit_id, condition.key, r.metric, _json(r.params), r.class_name,
                      _float_or_none(r.value), _float_or_none(r.low), _float_or_none(r.high), r.reason]
                     for r in results],
                )
            if differences:
                self.con.executemany(
                    "INSERT INTO differences VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [[audit_id, condition.key, d.metric, d.reference, _float_or_none(d.delta),
                      _float_or_none(d.low), _float_or_none(d.high), _float_or_none(d.p_value),
                      d.paired, _float_or_none(d.reference_value), _float_or_none(d.condition_value)]
                     for d in differences],
                )
            self.con.execute("COMMIT")
        except Exception:
            self.con.execute("ROLLBACK")
            raise

    def conditions(self, audit_id: str) -> list[Condition]:
        rows = self.con.execute(
            "SELECT key, kind, name, params, n, effective_n, too_small FROM conditions "
            "WHERE audit_id = ? ORDER BY finished_at, key", [audit_id]
        ).fetchall()
        return [Condition(r[0], r[1], r[2], json.loads(r[3]) if r[3] else {}, r[4], r[5], bool(r[6]))
                for r in rows]

    def predictions(self, audit_id: str, condition: str) -> dict[str, np.ndarray]:
        """Return ids, labels, probs (n, K) and weights of one condition, in row order."""
        rows = self.con.execute(
            "SELECT image_id, label, probs, weight FROM predictions "
            "WHERE audit_id = ? AND condition = ? ORDER BY row_index", [audit_id, condition]
        ).fetchall()
        if not rows:
            raise StoreError(f"audit {audit_id} has no stored predictions for condition {condition}")
        return {
            "ids": np.array([r[0] for r in rows], dtype=object),
            "labels": np.array([r[1] for r in rows], dtype=np.int64),
            "probs": np.array([r[2] for r in rows], dtype=np.float64),
            "weights": np.array([r[3] for r in rows], dtype=np.float64),
        }

    def results(self, audit_id: str) -> list[dict[str, Any]]:
        rows = self.con.execute(
            "SELECT condition, metric, params, class_name, value, low, high, reason FROM results "
            "WHERE audit_id = ?", [audit_id]
        ).fetchall()
        return [
            {"condition": r[0], "metric": r[1], "params": json.loads(r[2]) if r[2] else {},
             "class": r[3], "value": r[4], "low": r[5], "high": r[6], "reason": r[7]}
            for r in rows
        ]

    def differences(self, audit_id: str) -> list[dict[str, Any]]:
        rows = self.con.execute(
            "SELECT condition, metric, reference, delta, low, high, p_value, paired, "
            "reference_value, condition_value FROM differences WHERE audit_id = ?", [audit_id]
        ).fetchall()
        keys = ["condition", "metric", "reference", "delta", "low", "high", "p_value", "paired",
                "reference_value", "condition_value"]
        return [dict(zip(keys, r)) for r in rows]

    # findings, artifacts, reviews

    def save_findings(self, audit_id: str, findings: list[dict[str, Any]]) -> None:
        self.con.execute("BEGIN TRANSACTION")
        self.con.execute("DELETE FROM findings WHERE audit_id = ?", [audit_id])
        if findings:
            self.con.executemany(
                "INSERT INTO findings VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [[audit_id, f["id"], f["kind"], f["condition"], f["metric"],
                  _float_or_none(f.get("effect")), _float_or_none(f.get("low")),
                  _float_or_none(f.get("high")), _float_or_none(f.get("p_value")),
                  _float_or_none(f.get("q_value")), f.get("light"), f.get("summary"),
                  _json(f.get("evidence", {}))] for f in findings],
            )
        self.con.execute("COMMIT")

    def findings(self, audit_id: str) -> list[dict[str, Any]]:
        rows = self.con.execute(
            "SELECT finding_id, kind, condition, metric, effect, low, high, p_value, q_value, "
            "light, summary, evidence FROM findings WHERE audit_id = ? ORDER BY finding_id",
            [audit_id],
        ).fetchall()
        keys = ["id", "kind", "condition", "metric", "effect", "low", "high", "p_value", "q_value",
                "light", "summary", "evidence"]
        out = []
        for r in rows:
            item = dict(zip(keys, r))
            item["evidence"] = json.loads(item["evidence"]) if item["evidence"] else {}
            out.append(item)
        return out

    def save_artifact(self, audit_id: str, name: str, value: Any) -> None:
        self.con.execute("INSERT OR REPLACE INTO artifacts VALUES (?, ?, ?)",
                         [audit_id, name, _json(value)])

    def artifact(self, audit_id: str, name: str, default: Any = None) -> Any:
        row = self.con.execute("SELECT value FROM artifacts WHERE audit_id = ? AND name = ?",
                               [audit_id, name]).fetchone()
        return json.loads(row[0]) if row else default

    def add_review(self, audit_id: str, reviewer: str, verdict: str, comment: str,
                   finding_id: str | None = None) -> str:
        """Append a review; reviews are never updated or removed except with their audit."""
        self.require_audit(audit_id)
        if finding_id is not None:
            known = {f["id"] for f in self.findings(audit_id)}
            if finding_id not in known:
                raise StoreError(f"finding {finding_id} not found in audit {audit_id}")
        review_id = uuid.uuid4().hex[:12]
        self.con.execute("INSERT INTO reviews VALUES (?, ?, ?, ?, ?, ?, ?)",
                         [review_id, audit_id, _now(), reviewer, verdict, finding_id, comment])
        return review_id

    def reviews(self, audit_id: str) -> list[dict[str, Any]]:
        rows = self.con.execute(
            "SELECT review_id, created_at, reviewer, verdict, finding_id, comment FROM reviews "
            "WHERE audit_id = ? ORDER BY created_at", [audit_id]
        ).fetchall()
        keys = ["id", "created_at", "reviewer", "verdict", "finding", "comment"]
        return [dict(zip(keys, r)) for r in rows]
