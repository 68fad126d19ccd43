"""The patterns extractor: asset tags, alarm codes and numbers with units, from notes and log lines.

Every item is grounded by construction: ``start``/``end`` are offsets into the note's Python ``str``
(code points, not bytes or UTF-16 units) and ``text == note_text[start:end]`` always holds.

One dict per note; all three keys are always present and each list is sorted by ``start``.
``extract("P-101 discharge 4.5 bar, alarm E-042")`` gives::

    {"assets": [{"text": "P-101", "start": 0, "end": 5}],
     "codes": [{"text": "E-042", "start": 31, "end": 36}],
     "measurements": [{"text": "4.5 bar", "start": 16, "end": 23, "value": 4.5, "unit": "bar",
                       "quantity": "pressure", "normalized": {"value": 450.0, "unit": "kPa"}}]}

``value`` is the number as written, ``unit`` the canonical symbol of the unit as written ("amps" -> "A",
"lpm" -> "L/min", "185F" -> "degF"), and ``normalized`` the value converted by pint into the quantity's
canonical unit, rounded to 6 significant digits:

==================  ===============================================  =========
quantity            written as (examples; see ``_UNITS``)            canonical
==================  ===============================================  =========
pressure            bar barg mbar Pa kPa MPa psi psig                kPa
temperature         °C degC 85C °F degF 185F kelvin 300K             degC
current             A amps mA kA                                     A
voltage             V v volts VDC kV mV                              V
power               W kW kw MW hp                                    kW
vibration_velocity  mm/s in/s ips                                    mm/s
acceleration        g (standard gravity) m/s² m/s2                   m/s^2
rotational_speed    rpm RPM r/min                                    rpm
frequency           Hz kHz                                           Hz
speed               m/s                                              m/s
flow                l/min L/min lpm m3/h m³/h gpm (US gallons)       L/min
duration            ms s sec min mins h hr hrs hours days            s
percent             %                                                %
length              mm cm µm um micron                               mm
==================  ===============================================  =========

Hz is its own quantity: on a shop floor it is mostly supply or drive frequency, and turning it into
rpm would need the motor's pole count. Gauge and absolute suffixes (psig, barg) are kept in ``text``
but not corrected for. Deliberately not taken: bare "m" (metre or minute?), "d", "in", lowercase "a";
"C", "F" and "K" alone count only glued to the number ("185F", not "185 F"), and "K" not when a word
follows ("20K hours"); decimal commas ("4,5 bar" yields nothing rather than 45 bar); ranges.

Numbers come first and must stand alone: not glued to a word, a decimal point, "/" or a digit and
":"/"-". So "P-101A", "V-12 valve", "HX12 m", "12:30", "2024-05-01" and "1/2 in" give no measurement.
On overlap a measurement beats a code or an asset ("Line A 30 min" is 30 min, not code "A 30"), and
a code beats an asset ("E-042" matches both default patterns).

pint's registry takes about 0.4 s to build, so it is built once, on first use (``PatternsTask`` builds it
at start). Multiplicative units get a cached factor; temperatures (offset units) go through a pint
Quantity, since a factor would be wrong for them (memoised per exact reading: "85C" recurs all day).
"""

from __future__ import annotations

import functools
import math
import re
import threading
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ..config import PatternsTaskConfig

if TYPE_CHECKING:
    from ..message import Note

# quantity: (pint unit, symbol reported as normalized.unit)
_CANONICAL: dict[str, tuple[str, str]] = {
    "pressure": ("kilopascal", "kPa"),
    "temperature": ("degree_Celsius", "degC"),
    "current": ("ampere", "A"),
    "voltage": ("volt", "V"),
    "power": ("kilowatt", "kW"),
    "vibration_velocity": ("millimeter / second", "mm/s"),
    "acceleration": ("meter / second ** 2", "m/s^2"),
    "rotational_speed": ("revolution / minute", "rpm"),
    "frequency": ("hertz", "Hz"),
    "speed": ("meter / second", "m/s"),
    "flow": ("liter / minute", "L/min"),
    "duration": ("second", "s"),
    "percent": ("percent", "%"),
    "length": ("millimeter", "mm"),
}

# symbol: (pint unit, quantity, spellings matched exactly, spellings matched in any ASCII case)
_UNITS: dict[str, tuple[str, str, tuple[str, ...], tuple[str, ...]]] = {
    "bar": ("bar", "pressure", (), ("bar", "barg", "bara")),
    "mbar": ("millibar", "pressure", (), ("mbar",)),
    "Pa": ("pascal", "pressure", ("Pa",), ()),
    "kPa": ("kilopascal", "pressure", (), ("kpa",)),
    "MPa": ("megapascal", "pressure", (), ("mpa",)),  # nobody on a shop floor means millipascal
    "psi": ("psi", "pressure", (), ("psi", "psig", "psia")),
    "degC": ("degree_Celsius", "temperature", ("C",), ("°c", "ºc", "° c", "℃", "degc", "deg c", "celsius")),
    "degF": ("degree_Fahrenheit", "temperature", ("F",), ("°f", "ºf", "° f", "℉", "degf", "deg f")),
    "K": ("kelvin", "temperature", ("K",), ("kelvin",)),
    "A": ("ampere", "current", ("A",), ("amp", "amps", "ampere", "amperes")),
    "mA": ("milliampere", "current", ("mA",), ()),
    "kA": ("kiloampere", "current", ("kA",), ()),
    "V": ("volt", "voltage", (), ("v", "volt", "volts", "vac", "vdc")),
    "kV": ("kilovolt", "voltage", (), ("kv",)),
    "mV": ("millivolt", "voltage", ("mV",), ()),
    "W": ("watt", "power", ("W",), ("watt", "watts")),
    "kW": ("kilowatt", "power", (), ("kw",)),
    "MW": ("megawatt", "power", ("MW",), ()),
    "hp": ("horsepower", "power", (), ("hp",)),
    "mm/s": ("millimeter / second", "vibration_velocity", (), ("mm/s", "mm/sec")),
    "in/s": ("inch / second", "vibration_velocity", (), ("in/s", "in/sec", "ips")),
    "g": ("standard_gravity", "acceleration", ("g",), ()),  # pint's "g" is the gram
    "m/s^2": ("meter / second ** 2", "acceleration", ("m/s²", "m/s2", "m/s^2"), ()),
    "rpm": ("revolution / minute", "rotational_speed", (), ("rpm", "r/min")),
    "Hz": ("hertz", "frequency", (), ("hz",)),
    "kHz": ("kilohertz", "frequency", (), ("khz",)),
    "m/s": ("meter / second", "speed", ("m/s",), ()),
    "L/min": ("liter / minute", "flow", (), ("l/min", "lpm")),
    "m3/h": ("meter ** 3 / hour", "flow", (), ("m3/h", "m³/h", "m3/hr", "m³/hr")),
    "gpm": ("gallon / minute", "flow", (), ("gpm",)),
    "ms": ("millisecond", "duration", ("ms",), ()),
    "s": ("second", "duration", ("s",), ("sec", "secs", "second", "seconds")),
    "min": ("minute", "duration", (), ("min", "mins", "minute", "minutes")),
    "h": ("hour", "duration", (), ("h", "hr", "hrs", "hour", "hours")),
    "d": ("day", "duration", (), ("day", "days")),
    "%": ("percent", "percent", ("%",), ()),
    "mm": ("millimeter", "length", (), ("mm",)),
    "cm": ("centimeter", "length", (), ("cm",)),
    "um": ("micrometer", "length", (), ("µm", "μm", "um", "micron", "microns")),
}
_GLUED = ("C", "F", "K")  # only directly after the number

_EXACT: dict[str, str] = {}
_ANY_CASE: dict[str, str] = {}
for _sym, (_, _, _exact, _any_case) in _UNITS.items():
    _EXACT.update(dict.fromkeys(_exact, _sym))
    _ANY_CASE.update(dict.fromkeys((s.lower() for s in _any_case), _sym))


def _unit_alternation() -> str:
    spelled = [(s, False) for s in _EXACT if s not in _GLUED] + [(s, True) for s in _ANY_CASE]
    spelled.sort(key=lambda p: (-len(p[0]), p[0]))  # longest first: "mm/s" before "mm", "mins" before "min"
    return "|".join(f"(?ai:{re.escape(s)})" if any_case else re.escape(s) for s, any_case in spelled)


_SPACE = "[ \t\u00a0\u2009\u202f]"
_MEASUREMENT = re.compile(
    # Not glued to a word, decimal, fraction, asset tag or date; "12:30" is a time, "temp:85C" is not.
    r"(?<![\w.,/\-\u2212])(?<![0-9]:)"
    r"(?P<num>[-\u2212]?(?:[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?|[0-9]+(?:\.[0-9]+)?|\.[0-9]+))"
    rf"(?:{_SPACE}?(?P<unit>{_unit_alternation()})|(?P<glued>[CF]|K(?!{_SPACE}*[A-Za-z])))"
    r"(?![\w/^²³])"  # a whole unit: not "5 mins" read as "5 min", not "4 bar/s" read as "4 bar"
)


class _Conversions:
    """pint's registry plus what we derive from it once: a factor per multiplicative unit."""

    def __init__(self) -> None:
        import pint  # slow to import and to build; only once, and only when a unit is first needed

        self.ureg = pint.UnitRegistry()
        self.factors: dict[str, float] = {}
        self.offset: dict[str, tuple[Any, Any]] = {}  # symbol: (source unit, target unit)
        for sym, (unit, quantity, _, _) in _UNITS.items():
            target = _CANONICAL[quantity][0]
            if quantity == "temperature":
                self.offset[sym] = (self.ureg.Unit(unit), self.ureg.Unit(target))
            else:
                self.factors[sym] = float(self.ureg.Quantity(1.0, unit).to(target).magnitude)

        # Readings repeat ("85C" all day): remember recent offset conversions, which cost ~20 us each.
        self._offset_cached = functools.lru_cache(maxsize=4096)(self._offset_convert)

    def normalize(self, sym: str, value: float) -> float:
        factor = self.factors.get(sym)
        if factor is not None:
            return value * factor
        return self._offset_cached(sym, value)

    def _offset_convert(self, sym: str, value: float) -> float:
        source, target = self.offset[sym]
        return float(self.ureg.Quantity(value, source).to(target).magnitude)


_conversions_built: _Conversions | None = None
_conversions_lock = threading.Lock()


def _conversions() -> _Conversions:
    global _conversions_built
    if _conversions_built is None:
        with _conversions_lock:
            if _conversions_built is None:
                _conversions_built = _Conversions()
    return _conversions_built


def _round(x: float) -> float:
    return float(f"{x:.6g}") + 0.0  # + 0.0 turns -0.0 into 0.0


def _spans(patterns: Sequence[re.Pattern[str]], text: str) -> list[tuple[int, int]]:
    """Non-empty matches of any pattern; of overlapping ones the earliest (then longest) wins."""
    found = sorted(
        {m.span() for p in patterns for m in p.finditer(text) if m.end() > m.start()},
        key=lambda s: (s[0], -s[1]),
    )
    kept: list[tuple[int, int]] = []
    for start, end in found:
        if not kept or start >= kept[-1][1]:
            kept.append((start, end))
    return kept


def _without_overlaps(spans: list[tuple[int, int]], taken: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Drop spans that overlap any of `taken` (sorted, non-overlapping)."""
    if not taken:
        return spans
    starts = [s for s, _ in taken]
    out = []
    for start, end in spans:
        i = bisect_right(starts, start)
        if (i > 0 and taken[i - 1][1] > start) or (i < len(taken) and taken[i][0] < end):
            continue
        out.append((start, end))
    return out


def _measurements(text: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    conv: _Conversions | None = None
    for m in _MEASUREMENT.finditer(text):
        spelled = m["unit"] or m["glued"]
        sym = _EXACT.get(spelled) or _ANY_CASE.get(spelled.lower())
        if sym is None:  # cannot happen with the table above; never worth raising over
            continue
        value = float(m["num"].replace(",", "").replace("\u2212", "-"))
        if not math.isfinite(value):  # hundreds of digits overflow to inf
            continue
        conv = conv or _conversions()
        normalized = _round(conv.normalize(sym, value))
        if not math.isfinite(normalized):
            continue
        quantity = _UNITS[sym][1]
        out.append(
            {
                "text": m[0],
                "start": m.start(),
                "end": m.end(),
                "value": value + 0.0,
                "unit": sym,
                "quantity": quantity,
                "normalized": {"value": normalized, "unit": _CANONICAL[quantity][1]},
            }
        )
    return out


def _extract(
    text: str, assets: Sequence[re.Pattern[str]], codes: Sequence[re.Pattern[str]], units: bool
) -> dict[str, list[dict[str, Any]]]:
    measurements = _measurements(text) if units else []
    taken = [(m["start"], m["end"]) for m in measurements]
    code_spans = _without_overlaps(_spans(codes, text), taken)
    taken = sorted(taken + code_spans)
    asset_spans = _without_overlaps(_spans(assets, text), taken)
    return {
        "assets": [{"text": text[s:e], "start": s, "end": e} for s, e in asset_spans],
        "codes": [{"text": text[s:e], "start": s, "end": e} for s, e in code_spans],
        "measurements": measurements,
    }


_DEFAULTS = PatternsTaskConfig()


def extract(
    text: str,
    *,
    asset_patterns: Iterable[str | re.Pattern[str]] = _DEFAULTS.asset_patterns,
    code_patterns: Iterable[str | re.Pattern[str]] = _DEFAULTS.code_patterns,
    units: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """Assets, codes and measurements in `text` (see the module docstring for the shape).

    Patterns given as strings are compiled through ``re``'s own cache; a long-lived caller should use
    ``PatternsTask``, which compiles them once.
    """
    assets = [re.compile(p) for p in asset_patterns]
    codes = [re.compile(p) for p in code_patterns]
    return _extract(text, assets, codes, units)


class PatternsTask:
    """The ``patterns`` task: ``extract`` over a batch of notes, with the patterns compiled once."""

    def __init__(self, name: str, cfg: PatternsTaskConfig) -> None:
        self.name = name
        self._assets = tuple(re.compile(p) for p in cfg.asset_patterns)
        self._codes = tuple(re.compile(p) for p in cfg.code_patterns)
        self._units = cfg.units
        if self._units:
            _conversions()  # pay for pint's registry at start, not on the first message

    def process(self, notes: Sequence[Note]) -> list[dict[str, Any]]:
        return [_extract(note.text, self._assets, self._codes, self._units) for note in notes]

    def close(self) -> None:
        """Nothing to release: the task holds compiled patterns only."""
