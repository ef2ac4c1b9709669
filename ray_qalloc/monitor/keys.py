"""What the calibration series are made of: quantities and series keys.

A module of its own, with no imports from the rest of the package, because the drift model
(which the typed settings embed) and the series store (which needs the job store's SQL
helpers) both speak these names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class Quantity:
    """What a quantity is called and which way is worse."""

    name: str
    label: str
    worse: str            # "down" (coherence times) or "up" (errors)
    unit: str             # how the CLI shows it
    scale: float          # value * scale is shown in ``unit``


QUANTITIES: dict[str, Quantity] = {q.name: q for q in (
    Quantity("t1", "T1", "down", "µs", 1e6),
    Quantity("t2", "T2", "down", "µs", 1e6),
    Quantity("readout_error", "readout error", "up", "", 1.0),
    Quantity("sx_error", "sx error", "up", "", 1.0),
    Quantity("x_error", "x error", "up", "", 1.0),
    Quantity("gate_2q_error", "2q error", "up", "", 1.0),
)}
QUBIT_QUANTITIES = ("t1", "t2", "readout_error", "sx_error", "x_error")
# Single-qubit operations recorded per qubit, and the quantity each becomes.
QUBIT_GATE_QUANTITIES: dict[str, str] = {"sx": "sx_error", "x": "x_error"}


class SeriesKey(NamedTuple):
    """One series of one device: a quantity on a qubit ``(q,)`` or a coupler ``(a, b)``, a < b."""

    quantity: str
    qubits: tuple[int, ...]

    @property
    def element(self) -> str:
        """Storage form: ``"17"`` or ``"3-4"``."""
        return "-".join(str(q) for q in self.qubits)

    @property
    def element_label(self) -> str:
        return "q" + "-q".join(str(q) for q in self.qubits)

    @property
    def label(self) -> str:
        quantity = QUANTITIES.get(self.quantity)
        return f"{self.element_label} {quantity.label if quantity else self.quantity}"

    @classmethod
    def parse(cls, quantity: str, element: str) -> "SeriesKey":
        return cls(quantity, tuple(int(x) for x in element.split("-")))
