"""The audit chain's hashing and verification, pure: the digest of an entry, the stripe it
belongs to, and the check of stored entries against their chains and heads."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

GENESIS = "0" * 64

CHAINED_FIELDS = (
    "program_id", "actor", "role", "api_key_id", "ip", "user_agent", "action", "target",
    "before", "after",
)  # fmt: skip
"""The recorded fields an entry's hash covers (besides its link, position and time)."""

_JSON_FIELDS = ("before", "after")


def stripe_of(target: str, stripes: int) -> int:
    """The chain an entry about ``target`` joins: stable, so one target's entries share it."""
    return int.from_bytes(hashlib.sha256(target.encode()).digest()[:4], "big") % stripes


def _as_stored(value: Any) -> Any:
    """``value`` as a JSON column gives it back: tuples become lists, anything JSON has no
    type for becomes its text, as the digest has always written it."""
    if value is None:
        return None
    return json.loads(json.dumps(value, ensure_ascii=False, default=str))


def chained_fields(values: Mapping[str, Any]) -> dict[str, Any]:
    """The fields an entry's hash covers, normalised the same way when an entry is recorded
    and when a stored one is read back: what is hashed is exactly what is stored."""
    fields = {name: values.get(name) for name in CHAINED_FIELDS}
    for name in _JSON_FIELDS:
        fields[name] = _as_stored(fields[name])
    return fields


def as_utc(moment: datetime) -> datetime:
    """``moment`` in UTC; a naive one (SQLite text read without its column type) is UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def entry_digest(prev_hash: str, seq: int, at: datetime, fields: dict[str, Any]) -> str:
    """SHA-256 over the previous hash, the position, the time and every recorded field: the
    JSON of them all, keys sorted, as :func:`digest_parts` spells it."""
    before, between, after = digest_parts(at, fields)
    return hashlib.sha256(f"{before}{prev_hash}{between}{seq}{after}".encode()).hexdigest()


def digest_parts(at: datetime, fields: Mapping[str, Any]) -> tuple[str, str, str]:
    """The text an entry's digest covers, cut where its link and its position go:
    ``before + prev_hash + between + str(seq) + after`` is the compact JSON of
    ``{"prev": prev_hash, "seq": seq, "at": …, **fields}`` with its keys sorted. PostgreSQL
    joins the pieces to the head it locks in the statement that appends the entry."""
    values: dict[str, Any] = {"at": at.isoformat(), **fields}
    head = _members({k: v for k, v in values.items() if k < "prev"})
    middle = _members({k: v for k, v in values.items() if "prev" < k < "seq"})
    tail = _members({k: v for k, v in values.items() if k > "seq"})
    return (
        "{" + (head + "," if head else "") + '"prev":"',
        '",' + (middle + "," if middle else "") + '"seq":',
        ("," + tail if tail else "") + "}",
    )


def _members(values: Mapping[str, Any]) -> str:
    """The members of ``values``' compact JSON object, keys sorted, without its braces."""
    text = json.dumps(
        values, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str
    )
    return text[1:-1]


def seal_root(previous_root: str, heads: Mapping[int, tuple[int, str]]) -> str:
    """A checkpoint's root: the previous checkpoint's root and every stripe's head
    ``(seq, hash)``, in stripe order."""
    digest = hashlib.sha256(previous_root.encode())
    for stripe in sorted(heads):
        seq, head = heads[stripe]
        digest.update(f"|{stripe}:{seq}:{head}".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    """A stored checkpoint: the heads it sealed, and the roots it was stored with."""

    id: int
    heads: Mapping[int, tuple[int, str]]
    previous_root: str
    root_hash: str


def checkpoint_problems(
    checkpoints: list[Checkpoint], sealed: Mapping[tuple[int, int], str], kept_root: str | None
) -> list[Problem]:
    """What is wrong with the checkpoints, in id order: one altered (its root is not that of
    its heads and its predecessor's root), an entry it sealed gone or changed (``sealed``:
    the stored hash at each sealed stripe and seq), or ``kept_root``, the root kept outside
    the database, sealed by none of them (the checkpoints were rewritten too)."""
    problems: list[Problem] = []
    previous = GENESIS
    for checkpoint in checkpoints:
        root = seal_root(checkpoint.previous_root, checkpoint.heads)
        if checkpoint.previous_root != previous or root != checkpoint.root_hash:
            problems.append(
                Problem(
                    f"checkpoint {checkpoint.id} was altered: its root is not the hash of its "
                    "heads and the checkpoint before it",
                    f"检查点 {checkpoint.id} 被改动过:其根哈希与链头及上一检查点不符",
                )
            )
        for stripe, (seq, head) in sorted(checkpoint.heads.items()):
            if seq and sealed.get((stripe, seq)) != head:
                problems.append(
                    Problem(
                        f"the entry checkpoint {checkpoint.id} sealed here is gone or changed: "
                        "the log was rewritten after it",
                        f"检查点 {checkpoint.id} 封存的记录已不存在或被改动:其后日志被改写",
                        stripe=stripe,
                        seq=seq,
                    )
                )
        previous = checkpoint.root_hash
    if kept_root is not None and kept_root not in {c.root_hash for c in checkpoints}:
        problems.append(
            Problem(
                f"no checkpoint has the root {kept_root}: the checkpoints were removed or "
                "rewritten, or the root is of another installation",
                f"没有根哈希为 {kept_root} 的检查点:检查点被删除或改写,或该根哈希属于另一套系统",
            )
        )
    return problems


# --------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class StoredEntry:
    """An entry as read back from the database."""

    id: int
    stripe: int
    seq: int
    at: datetime
    fields: Mapping[str, Any]
    prev_hash: str
    hash: str


@dataclass(frozen=True)
class Problem:
    """One thing found wrong in the audit log, with the entry, stripe and position it is
    about, in English and Chinese."""

    what: str
    what_zh: str
    entry_id: int | None = None
    stripe: int | None = None
    seq: int | None = None

    def message(self, language: str = "en") -> str:
        """The problem in ``language`` ("en" or "zh"), led by where it is."""
        zh = language.lower().startswith("zh")
        position = []
        if self.stripe is not None:
            position.append(f"链 {self.stripe}" if zh else f"stripe {self.stripe}")
        if self.seq is not None:
            position.append(f"序号 {self.seq}" if zh else f"seq {self.seq}")
        if self.entry_id is not None:
            where = f"条目 {self.entry_id}" if zh else f"entry {self.entry_id}"
            if position:
                where += f"({','.join(position)})" if zh else f" ({', '.join(position)})"
        else:
            where = ("," if zh else ", ").join(position)
        text = self.what_zh if zh else self.what
        if not where:
            return text
        return f"{where}:{text}" if zh else f"{where}: {text}"

    def __str__(self) -> str:
        return self.message("en")


@dataclass(frozen=True)
class _End:
    seq: int
    hash: str
    entry_id: int | None


_START = _End(0, GENESIS, None)


@dataclass
class ChainVerifier:
    """Checks stored entries against their chains: feed every entry with :meth:`add`, each
    stripe's in ascending ``seq`` (stripe after stripe, or interleaved), then compare the
    chains' ends with the stored heads with :meth:`finish`. Keeps one end per stripe, so
    memory does not grow with the log."""

    stripes: int
    entries: int = 0
    problems: list[Problem] = field(default_factory=list)
    _ends: dict[int, _End] = field(default_factory=dict)

    @property
    def chains(self) -> int:
        """Stripes that hold at least one entry."""
        return len(self._ends)

    def add(self, entry: StoredEntry) -> None:
        """Check one entry: its hash, its stripe, its position and its link."""
        self.entries += 1
        end = self._ends.get(entry.stripe, _START)
        fields = chained_fields(entry.fields)
        at = as_utc(entry.at)
        where = {"entry_id": entry.id, "stripe": entry.stripe, "seq": entry.seq}
        if entry_digest(entry.prev_hash, entry.seq, at, fields) != entry.hash:
            self.problems.append(
                Problem(
                    "was edited: its recorded fields no longer match its hash",
                    "被改动过:记录的内容与其哈希不符",
                    **where,
                )
            )
        target = fields.get("target")
        belongs = stripe_of(target, self.stripes) if isinstance(target, str) else None
        if belongs != entry.stripe:
            self.problems.append(
                Problem(
                    f"its target belongs to stripe {belongs}: moved between chains out of band",
                    f"其对象属于链 {belongs}:在 jifen 之外被移到了别的链",
                    **where,
                )
            )
        after = f"entry {end.entry_id} (seq {end.seq})" if end.entry_id else "the chain's start"
        after_zh = f"条目 {end.entry_id}(序号 {end.seq})" if end.entry_id else "链首"
        if entry.seq > end.seq + 1:
            missing = (
                f"{end.seq + 1}" if entry.seq == end.seq + 2 else f"{end.seq + 1}..{entry.seq - 1}"
            )
            self.problems.append(
                Problem(
                    f"follows {after}, but seq {missing} of its chain is missing: entries "
                    "were removed out of band",
                    f"前一条是{after_zh},但本链序号 {missing} 缺失:有记录在 jifen 之外被删除",
                    **where,
                )
            )
        elif entry.seq <= end.seq:
            self.problems.append(
                Problem(
                    f"repeats or reorders a position its chain already holds (after {after})",
                    f"与本链已有的位置重复或顺序颠倒(在{after_zh}之后)",
                    **where,
                )
            )
        elif entry.prev_hash != end.hash:
            self.problems.append(
                Problem(
                    f"does not link to {after}, the entry before it: inserted, or that "
                    "entry rewritten, out of band",
                    f"未链接到前一条{after_zh}:有记录在 jifen 之外被插入或改写",
                    **where,
                )
            )
        # Carry on from the stored entry, so one bad entry is reported once, not to the end.
        if entry.seq > end.seq:
            self._ends[entry.stripe] = _End(entry.seq, entry.hash, entry.id)

    def finish(self, heads: Mapping[int, tuple[int, str]]) -> list[Problem]:
        """Compare each chain's last entry with its head ``(seq, hash)`` in ``heads``; every
        stripe needs a head. Returns every problem found, from :meth:`add` as well."""
        for stripe in sorted(set(range(self.stripes)) | set(heads) | set(self._ends)):
            problem = self._head_problem(stripe, self._ends.get(stripe, _START), heads.get(stripe))
            if problem is not None:
                self.problems.append(problem)
        return self.problems

    @staticmethod
    def _head_problem(stripe: int, end: _End, head: tuple[int, str] | None) -> Problem | None:
        last = f"entry {end.entry_id}" if end.entry_id else "no entry"
        last_zh = f"条目 {end.entry_id}" if end.entry_id else "无记录"
        if head is None:
            return Problem(
                "has no head in audit_heads: the head row was deleted",
                "在 audit_heads 中没有链头:链头记录被删除",
                entry_id=end.entry_id,
                stripe=stripe,
            )
        seq, digest = head
        if (seq, digest) == (end.seq, end.hash):
            return None
        if seq > end.seq:  # the entries the head counts are gone: no id to name
            return Problem(
                f"the head says the chain holds {seq} entries but it ends at seq {end.seq} "
                f"({last}): its last entries were removed, or the head was rewritten",
                f"链头记录本链有 {seq} 条,但链止于序号 {end.seq}({last_zh}):"
                "末尾的记录被删除,或链头被改写",
                stripe=stripe,
                seq=seq,
            )
        if seq < end.seq:
            return Problem(
                f"the chain runs to this entry but the head says {seq}: entries were added "
                "out of band, or the head was rewound",
                f"链延续到本条,但链头只记录到序号 {seq}:有记录在 jifen 之外被添加,或链头被回退",
                entry_id=end.entry_id,
                stripe=stripe,
                seq=end.seq,
            )
        if end.entry_id is None:
            return Problem(
                "the chain is empty but its head's hash is not the starting one: the head was "
                "rewritten",
                "本链没有记录,但链头的哈希不是初始值:链头被改写",
                stripe=stripe,
                seq=seq,
            )
        return Problem(
            "the chain's head does not hold this entry's hash: the head or this entry was "
            "rewritten",
            "链头记录的哈希与本条(本链最后一条)不符:链头或本条被改写",
            entry_id=end.entry_id,
            stripe=stripe,
            seq=seq,
        )
