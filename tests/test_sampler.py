"""QAllocSampler against Qiskit's reference StatevectorSampler, on a real local Ray and real Aer.

Distributions are compared by total variation distance (TVD). With 4000 shots on each side the
TVD of two samples of the same small distribution is ~0.015 (rarely over 0.03), so TOL = 0.05
does not flake; every circuit is asymmetric enough that a wrong bit order or a swapped
parameter setting moves the TVD past 4 × TOL, and the tests check that they would.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from qiskit import ClassicalRegister, QuantumCircuit, QuantumRegister
from qiskit.circuit import Clbit, Parameter
from qiskit.primitives import BitArray, PrimitiveResult, SamplerPubResult, StatevectorSampler

import ray_qalloc
from ray_qalloc.exceptions import InvalidJobSpec, QAllocError
from ray_qalloc.sampler import InvalidPub, QAllocSampler, _samples

pytestmark = pytest.mark.timeout(300)

EXACT = ["statevector"]
SHOTS = 4000
TOL = 0.05
SEED = 1234

ONE_D = [[0.3, 2.5], [2.8, 0.4], [1.2, 0.0], [1.9, 3.0], [3.1, 1.6]]
TWO_D = [[[0.5, 2.0], [2.0, 0.5], [1.0, 2.9]], [[2.9, 1.0], [0.2, 1.5], [1.5, 0.2]]]


class CountingClient:
    """The session, with submit_many calls and jobs counted (to see round trips)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0
        self.jobs = 0

    def submit_many(self, jobs: list[dict[str, Any]]) -> list[Any]:
        self.calls += 1
        self.jobs += len(jobs)
        return self.inner.submit_many(jobs)


@pytest.fixture
def client(qa: Any) -> CountingClient:
    return CountingClient(qa)


@pytest.fixture
def sampler(client: CountingClient) -> QAllocSampler:
    return QAllocSampler(client, default_shots=SHOTS, backends=EXACT, timeout_s=120)


def bell() -> QuantumCircuit:
    qc = QuantumCircuit(2, 2, metadata={"name": "bell"})
    qc.h(0)
    qc.cx(0, 1)
    qc.measure([0, 1], [0, 1])
    return qc


def two_registers() -> QuantumCircuit:
    """a = (q1, q0=1, q2=0) with P(q1)=0.75; b = (q3=1, q4) with P(q4)=0.25 (bit 0 listed first)."""
    a, b = ClassicalRegister(3, "a"), ClassicalRegister(2, "b")
    qc = QuantumCircuit(QuantumRegister(5), a, b)
    qc.x(0)
    qc.ry(2 * math.pi / 3, 1)
    qc.x(3)
    qc.ry(math.pi / 3, 4)
    qc.measure([1, 0, 2], [a[0], a[1], a[2]])
    qc.measure([3, 4], [b[0], b[1]])
    return qc


def ry_pair() -> QuantumCircuit:
    t0, t1 = Parameter("t0"), Parameter("t1")
    qc = QuantumCircuit(2, 2)
    qc.ry(t0, 0)
    qc.ry(t1, 1)
    qc.measure([0, 1], [0, 1])
    return qc


def probs(bits: BitArray, loc: tuple[int, ...] | None = None) -> dict[str, float]:
    counts = bits.get_counts(loc)
    total = sum(counts.values())
    return {k: v / total for k, v in counts.items()}


def tvd(p: dict[str, float], q: dict[str, float]) -> float:
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


def swapped(p: dict[str, float]) -> dict[str, float]:
    """The distribution a reversed bit order would report."""
    return {k[::-1]: v for k, v in p.items()}


def reference(pubs: list[Any], shots: int = SHOTS) -> PrimitiveResult:
    return StatevectorSampler(seed=SEED).run(pubs, shots=shots).result()


def test_bell_matches_reference(sampler: QAllocSampler) -> None:
    job = sampler.run([bell()])
    result = job.result()
    assert isinstance(result, PrimitiveResult) and result.metadata == {"version": 2}
    pub = result[0]
    assert isinstance(pub, SamplerPubResult)
    bits = pub.data.c
    assert isinstance(bits, BitArray)
    assert (bits.shape, bits.num_bits, bits.num_shots) == ((), 2, SHOTS)
    assert set(bits.get_counts()) == {"00", "11"}
    assert tvd(probs(bits), probs(reference([bell()])[0].data.c)) < TOL
    meta = pub.metadata
    assert meta["shots"] == SHOTS and meta["circuit_metadata"] == {"name": "bell"}
    assert [b.split("/")[1] for b in meta["backends"]] == EXACT      # ran on the pool's statevector
    assert meta["job_ids"] == job.job_ids and len(meta["job_ids"]) == 1
    assert job.done() and job.in_final_state() and not job.cancelled()


def test_two_registers_keep_their_bits(sampler: QAllocSampler) -> None:
    data = sampler.run([two_registers()]).result()[0].data
    ref = reference([two_registers()])[0].data
    assert (data.a.num_bits, data.b.num_bits) == (3, 2)
    assert set(data.a.get_counts()) == {"011", "010"}       # a[1]=1, a[2]=0 always
    assert set(data.b.get_counts()) == {"01", "11"}         # b[0]=1 always
    assert abs(probs(data.a)["011"] - 0.75) < TOL
    assert abs(probs(data.b)["11"] - 0.25) < TOL
    for name in ("a", "b"):
        ours, theirs = probs(data[name]), probs(ref[name])
        assert tvd(ours, theirs) < TOL
        assert tvd(swapped(theirs), theirs) > 4 * TOL        # a reversed order would be caught


def test_parameter_arrays_match_reference_setting_by_setting(sampler: QAllocSampler,
                                                              client: CountingClient) -> None:
    pubs = [(ry_pair(), np.array(ONE_D)), (ry_pair(), np.array(TWO_D))]
    result = sampler.run(pubs).result()
    ref = reference(pubs)
    assert client.calls == 1 and client.jobs == 5 + 6          # both pubs: one round trip
    for ours, theirs, shape in zip(result, ref, [(5,), (2, 3)]):
        assert ours.data.shape == shape and ours.data.c.shape == shape
        assert ours.data.c.num_shots == SHOTS
        assert len(ours.metadata["job_ids"]) == len(set(ours.metadata["job_ids"])) == math.prod(shape)
        settings = list(np.ndindex(shape))
        for idx in settings:
            expected = probs(theirs.data.c, idx)
            assert tvd(probs(ours.data.c, idx), expected) < TOL, idx
            # The test could fail: a swapped bit order or any other setting is far away.
            assert tvd(swapped(expected), expected) > 4 * TOL
            for other in settings:
                if other != idx:
                    assert tvd(probs(theirs.data.c, other), expected) > 4 * TOL


def test_several_pubs_one_round_trip_in_order(sampler: QAllocSampler, client: CountingClient) -> None:
    pubs = [bell(), (ry_pair(), ONE_D[:2]), two_registers()]
    result = sampler.run(pubs).result()
    assert client.calls == 1 and client.jobs == 4
    assert len(result) == 3
    assert set(result[0].data.c.get_counts()) == {"00", "11"}
    assert result[1].data.c.shape == (2,)
    assert set(result[2].data.a.get_counts()) == {"011", "010"}


def test_shots_pub_over_run_over_default(client: CountingClient) -> None:
    sampler = QAllocSampler(client, default_shots=64, backends=EXACT, timeout_s=120)
    result = sampler.run([(bell(), None, np.int64(100)), bell()], shots=300).result()
    assert [r.data.c.num_shots for r in result] == [100, 300]
    assert [r.metadata["shots"] for r in result] == [100, 300]
    assert sampler.run([bell()]).result()[0].data.c.num_shots == 64


def test_bad_pubs_raise_what_the_reference_raises(sampler: QAllocSampler, client: CountingClient) -> None:
    """Each bad pub: ours raises an error of the class StatevectorSampler raises (ValueError or
    TypeError), naming the pub and how to fix it, before anything is sent."""
    cases = [
        ([(ry_pair(), [0.1])], r"2 parameter\(s\): t0, t1"),       # 1 value, 2 parameters
        ([(ry_pair(), [[0.1, 0.2, 0.3]])], r"2 parameter\(s\)"),
        ([(bell(), [0.5])], r"0 parameter\(s\)"),
        ([ry_pair()], "number of values"),                          # parameters, no values
        ([bell(), (bell(), None, 0)], "pub 1: shots must be positive"),
        ([("not a circuit",)], "QuantumCircuit"),                   # TypeError in Qiskit
    ]
    for pubs, words in cases:
        with pytest.raises(Exception) as theirs:
            StatevectorSampler().run(pubs).result()
        with pytest.raises(type(theirs.value), match=words) as info:
            sampler.run(pubs)
        assert isinstance(info.value, QAllocError) and "To fix:" in str(info.value)
    with pytest.raises(InvalidPub, match="single one"):
        sampler.run(bell())  # type: ignore[arg-type]
    with pytest.raises(InvalidPub, match="shots"):
        sampler.run([bell()], shots=0)
    assert client.calls == 0


def test_bad_options_refused_at_construction(client: CountingClient) -> None:
    with pytest.raises(InvalidJobSpec, match="priority"):
        QAllocSampler(client, priority="urgent")
    with pytest.raises(InvalidJobSpec, match="fidelity_min"):
        QAllocSampler(client, fidelity_min=2.0)
    with pytest.raises(InvalidPub, match="default_shots"):
        QAllocSampler(client, default_shots=0)


def test_noisy_emulated_qpu_is_close(client: CountingClient) -> None:
    sampler = QAllocSampler(client, intent="quantum", backends=["qpu_torino"], timeout_s=240)
    pub = sampler.run([(bell(), None, 2000)]).result()[0]
    assert pub.metadata["backends"] == ["qpu_torino"]
    ours = probs(pub.data.c)
    assert tvd(ours, probs(reference([bell()])[0].data.c)) < 0.12   # noise, but a Bell state
    assert ours.get("01", 0.0) + ours.get("10", 0.0) > 0.0           # and it is noisy


def test_default_client_is_connect(qa: Any, data_dir: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QALLOC_DATA_DIR", str(data_dir))
    sampler = ray_qalloc.QAllocSampler(default_shots=200, backends=EXACT, timeout_s=120)
    assert set(sampler.run([bell()]).result()[0].data.c.get_counts()) == {"00", "11"}


def test_counts_keys_in_every_format() -> None:
    """Space-separated registers, hex and int keys all land on the same bits (bit i = clbit i)."""
    as_text = _samples({"1 10": 2, "0 01": 1}, 3, 3, "j")
    as_hex = _samples({"0x6": 2, "0x1": 1}, 3, 3, "j")
    as_int = _samples({6: 2, 1: 1}, 3, 3, "j")
    expected = np.array([[0, 1, 1], [0, 1, 1], [1, 0, 0]], dtype=bool)
    for got in (as_text, as_hex, as_int):
        assert np.array_equal(got, expected)
    with pytest.raises(QAllocError, match="returned 2 shots"):
        _samples({"101": 2}, 3, 3, "j")
    with pytest.raises(QAllocError, match="not 3 classical bits"):
        _samples({"1011": 3}, 3, 3, "j")


# ---------------------------------------------------------------------------------------------
# Behaviours of Qiskit's reference samplers (StatevectorSampler, Aer's SamplerV2)
# ---------------------------------------------------------------------------------------------

def test_seed_and_default_shots_like_the_reference(client: CountingClient) -> None:
    """The same seed on the same method gives the same counts (and the same BitArrays); another
    seed gives others; ``seed`` and ``default_shots`` read back as on StatevectorSampler."""
    pub = (ry_pair(), [[0.7, 2.1], [1.5, 0.3]])

    def run(seed: int | None) -> BitArray:
        s = QAllocSampler(client, default_shots=500, seed=seed, backends=EXACT, timeout_s=120)
        assert (s.default_shots, s.seed) == (500, seed)
        return s.run([pub]).result()[0].data.c

    first, again, other = run(42), run(42), run(43)
    assert [first.get_counts(i) for i in range(2)] == [again.get_counts(i) for i in range(2)]
    assert np.array_equal(first.array, again.array)
    assert [first.get_counts(i) for i in range(2)] != [other.get_counts(i) for i in range(2)]
    ref = StatevectorSampler(default_shots=500, seed=42)
    assert (ref.default_shots, ref.seed) == (500, 42)
    assert not np.array_equal(run(None).array, run(None).array)
    with pytest.raises(ValueError, match="seed"):
        QAllocSampler(client, seed=np.random.default_rng(1))   # type: ignore[arg-type]


def test_no_classical_registers_warns_and_gives_an_empty_result(sampler: QAllocSampler,
                                                               client: CountingClient) -> None:
    no_cregs = QuantumCircuit(2)
    no_cregs.h(0)
    no_cregs.cx(0, 1)
    pubs = [no_cregs, (ry_pair(), [[0.1, 0.2]] * 3), bell()]
    with pytest.warns(UserWarning, match="no output classical registers") as ours_w:
        ours = sampler.run(pubs).result()
    with pytest.warns(UserWarning) as theirs_w:
        theirs = StatevectorSampler().run(pubs, shots=SHOTS).result()
    assert str(ours_w[0].message) == str(theirs_w[0].message)
    assert list(ours[0].data) == list(theirs[0].data) == []
    assert ours[0].data.shape == theirs[0].data.shape == ()
    assert ours[0].metadata["shots"] == SHOTS and ours[0].metadata["job_ids"] == []
    assert ours[1].data.c.shape == (3,) and set(ours[2].data.c.get_counts()) == {"00", "11"}
    assert client.calls == 1 and client.jobs == 3 + 1          # nothing was sent for the empty pub


def test_unmeasured_registers_read_zeros(sampler: QAllocSampler, client: CountingClient) -> None:
    qc = QuantumCircuit(2, 3)
    qc.h(0)
    ours = sampler.run([qc]).result()[0].data.c
    theirs = reference([qc])[0].data.c
    assert ours.get_counts() == theirs.get_counts() == {"000": SHOTS}
    assert client.calls == 0


def test_registers_sharing_bits_and_loose_bits(sampler: QAllocSampler) -> None:
    """Aliasing: register `a` holds clbits 0-2, `b` holds clbits 1 and 3 (shared bit 1), clbit 4
    is in no register; each register reads its bits as StatevectorSampler reads them."""
    bits = [Clbit() for _ in range(5)]
    a = ClassicalRegister(bits=[bits[0], bits[1], bits[2]], name="a")
    b = ClassicalRegister(bits=[bits[3], bits[1]], name="b")
    qc = QuantumCircuit(QuantumRegister(4), bits, a, b)
    qc.x(0)
    qc.ry(2 * math.pi / 3, 1)      # P(1) = 0.75
    qc.ry(math.pi / 3, 2)          # P(1) = 0.25
    qc.h(3)
    qc.measure([0, 1, 2, 3, 0], bits)
    ours = sampler.run([qc]).result()[0].data
    theirs = reference([qc])[0].data
    assert (ours.a.num_bits, ours.b.num_bits) == (3, 2) and sorted(ours) == sorted(theirs) == ["a", "b"]
    for name in ("a", "b"):
        assert tvd(probs(ours[name]), probs(theirs[name])) < TOL, name
    # the shared bit agrees shot by shot: a's bit 1 is b's bit 1
    assert np.array_equal(ours.a.slice_bits(1).array, ours.b.slice_bits(1).array)
