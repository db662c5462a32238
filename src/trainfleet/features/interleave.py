"""Model-based randomized checking of a feature store's guards.

:func:`run_interleavings` drives a store through a seeded random sequence of put, re-put,
get, release, retain, abort, collect and clock moves, with forged and re-signed refs mixed
in, and checks every outcome against a small reference model of the rules. What counts:

- a *silent success*: a get the model says must fail returned data, or a get returned
  tensors other than the ones put (bytes, dtype or shape) -- the failure that corrupts
  training without anyone noticing;
- a *wrong error*: a get failed with another error than the model's (or failed at all when
  it should have succeeded);
- a *mismatch*: release / retain / abort / collect / put disagreed with the model.

Tensors returned by a get are scribbled over, and so are the caller's tensors after a put:
a store that aliased either would fail a later get (clone on fetch, copy on put).
The tests run a few thousand ops per backend; ``bench/features.py`` runs 1e5.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from trainfleet.errors import BadRef, FeatureError, HashMismatch, SampleGone, StaleGeneration
from trainfleet.features.ref import SampleRef, encode_tensors, sign_ref
from trainfleet.features.store import FeatureStore

StoreFactory = Callable[..., FeatureStore]
ReaderFactory = Callable[[FeatureStore, bytes], FeatureStore]
_DTYPES = [torch.float32, torch.int64, torch.bfloat16, torch.uint8, torch.bool, torch.float16]
_MAX_FAILURES = 20


@dataclass
class InterleaveReport:
    """What :func:`run_interleavings` saw."""

    ops: int = 0
    gets: int = 0
    ok_gets: int = 0  # gets the model expected to succeed (and that did, with exact tensors)
    silent_successes: int = 0
    wrong_errors: int = 0
    mismatches: int = 0
    op_counts: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # the first few, described

    @property
    def ok(self) -> bool:
        return self.silent_successes == self.wrong_errors == self.mismatches == 0

    def _fail(self, what: str, counter: str) -> None:
        setattr(self, counter, getattr(self, counter) + 1)
        if len(self.failures) < _MAX_FAILURES:
            self.failures.append(f"op {self.ops}: {what}")


class _Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class _Sample:
    refs: int
    gone: str | None
    tensors: dict[str, torch.Tensor]
    created_at: float


def _random_tensors(rng: random.Random) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(rng.randint(1, 3)):
        dtype = rng.choice(_DTYPES)
        shape = [rng.choice([0, 1, 2, 3, 5, 17]) for _ in range(rng.randint(0, 3))]
        if 0 in shape and rng.random() < 0.7:
            shape = [max(d, 1) for d in shape]
        g = torch.Generator().manual_seed(rng.getrandbits(32))
        if dtype.is_floating_point:
            t = torch.randn(shape, generator=g).to(dtype)
        elif dtype == torch.bool:
            t = torch.randint(0, 2, shape, generator=g).bool()
        else:
            t = torch.randint(0, 200, shape, generator=g).to(dtype)
        out[f"t{i}"] = t
    return out


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a
    )


def _scribble(tensors: dict[str, torch.Tensor]) -> None:
    for t in tensors.values():
        if t.numel():
            t.fill_(True if t.dtype == torch.bool else 7)
            if t.dtype == torch.bool:
                t.logical_not_()


def run_interleavings(
    store_factory: StoreFactory,
    num_ops: int,
    seed: int,
    *,
    reader_factory: ReaderFactory | None = None,
    num_keys: int = 32,
    max_age_s: float = 100.0,
) -> InterleaveReport:
    """Run ``num_ops`` random operations on ``store_factory(secret=, clock=, max_age_s=)``
    and report every disagreement with the model. Puts, aborts and collects go to that
    store; gets, releases and retains go to ``reader_factory(store, secret)`` when given
    (another view of the same data: a second directory handle, an HTTP client)."""
    rng = random.Random(seed)
    clock = _Clock()
    secret = rng.randbytes(32)
    other_secret = rng.randbytes(32)
    store = store_factory(secret=secret, clock=clock, max_age_s=max_age_s)
    reader = reader_factory(store, secret) if reader_factory is not None else store
    report = InterleaveReport()
    keys = [f"k{i}" for i in range(num_keys)]
    current: dict[str, int] = {}  # key -> its current generation
    samples: dict[tuple[str, int], _Sample] = {}
    refs: list[SampleRef] = []

    def expect(ref: SampleRef) -> type[FeatureError] | str | None:
        """None: the get succeeds; a class: it fails so; "gone:<reason>" for SampleGone."""
        if ref.generation != current.get(ref.key):
            return StaleGeneration
        gone = samples[(ref.key, ref.generation)].gone
        return None if gone is None else f"gone:{gone}"

    def resign(ref: SampleRef, key: bytes = secret, **change: object) -> SampleRef:
        fields = ref.model_dump(exclude={"mac"})
        fields.update(change)
        return sign_ref(**fields, secret=key)

    def check_get(ref: SampleRef, want: type[FeatureError] | str | None) -> None:
        report.gets += 1
        try:
            got = reader.get(ref)
        except FeatureError as e:
            seen = f"gone:{e.reason}" if isinstance(e, SampleGone) else type(e)
            if want is None:
                report._fail(f"get {ref.key}@{ref.generation}: raised {e!r}", "wrong_errors")
            elif seen != want:
                report._fail(
                    f"get {ref.key}@{ref.generation}: want {want}, got {e!r}", "wrong_errors"
                )
            return
        if want is not None:
            report._fail(
                f"get {ref.key}@{ref.generation}: want {want}, got data", "silent_successes"
            )
        elif not _same(got, samples[(ref.key, ref.generation)].tensors):
            report._fail(f"get {ref.key}@{ref.generation}: wrong tensors", "silent_successes")
        else:
            report.ok_gets += 1
            _scribble(got)

    ops = ["put"] * 25 + ["get"] * 35 + ["release"] * 15 + ["forged"] * 7
    ops += ["retain"] * 5 + ["abort"] * 5 + ["advance"] * 5 + ["collect"] * 3
    try:
        for _ in range(num_ops):
            op = "put" if not refs else rng.choice(ops)
            report.ops += 1
            report.op_counts[op] = report.op_counts.get(op, 0) + 1
            ref = rng.choice(refs[-12:]) if refs and rng.random() < 0.8 else None
            if ref is None and refs:
                ref = rng.choice(refs)
            if op == "put":
                key = rng.choice(keys)
                tensors = _random_tensors(rng)
                holders = rng.randint(1, 3)
                new = store.put(f"s{report.ops}", tensors, key=key, holders=holders)
                generation = current.get(key, 0) + 1
                if new.generation != generation or new.size != len(encode_tensors(tensors)):
                    report._fail(
                        f"put {key}: got generation {new.generation}, want {generation}",
                        "mismatches",
                    )
                current[key] = new.generation
                kept = {k: t.clone() for k, t in tensors.items()}
                samples[(key, new.generation)] = _Sample(holders, None, kept, clock.now)
                _scribble(tensors)  # the store must have copied them
                refs.append(new)
            elif op == "get":
                assert ref is not None
                check_get(ref, expect(ref))
            elif op == "forged":
                assert ref is not None
                kind = rng.choice(["secret", "altered", "store", "digest", "size"])
                if kind == "secret":
                    check_get(resign(ref, other_secret), BadRef)
                elif kind == "altered":
                    check_get(ref.model_copy(update={"generation": ref.generation + 1}), BadRef)
                elif kind == "store":
                    check_get(resign(ref, store="mem:elsewhere"), BadRef)
                else:
                    bad = (
                        resign(ref, digest=f"{int(ref.digest, 16) ^ 1:064x}")
                        if kind == "digest"
                        else resign(ref, size=ref.size + 1)
                    )
                    check_get(bad, expect(ref) or HashMismatch)
            elif op in ("release", "retain", "abort"):
                assert ref is not None
                sample = samples[(ref.key, ref.generation)]
                live = current[ref.key] == ref.generation and sample.gone is None
                if op == "release":
                    freed = reader.release(ref)
                    want_freed = live and sample.refs == 1
                    if live:
                        sample.refs -= 1
                        sample.gone = "released" if sample.refs == 0 else None
                    if freed != want_freed:
                        report._fail(
                            f"release {ref.key}@{ref.generation}: {freed}, want {want_freed}",
                            "mismatches",
                        )
                elif op == "abort":
                    store.abort(ref)
                    if live:
                        sample.refs, sample.gone = 0, "aborted"
                else:
                    want = expect(ref)
                    try:
                        reader.retain(ref)
                        seen: object = None
                    except FeatureError as e:
                        seen = f"gone:{e.reason}" if isinstance(e, SampleGone) else type(e)
                    if seen != want:
                        report._fail(
                            f"retain {ref.key}@{ref.generation}: {seen}, want {want}", "mismatches"
                        )
                    if want is None:
                        sample.refs += 1
            elif op == "advance":
                clock.now += rng.uniform(0, max_age_s / 3)
            else:
                want_n = 0
                for key, generation in current.items():
                    sample = samples[(key, generation)]
                    if sample.gone is None and clock.now - sample.created_at > max_age_s:
                        sample.refs, sample.gone = 0, "expired"
                        want_n += 1
                n = store.collect()
                if n != want_n:
                    report._fail(f"collect: freed {n}, want {want_n}", "mismatches")
    finally:
        if reader is not store:
            reader.close()
        store.close()
    return report
