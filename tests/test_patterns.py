"""The patterns extractor: golden notes, tricky negatives, config, and never-raise/grounding properties."""

from __future__ import annotations

import itertools
import json
import math
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.config import PatternsTaskConfig
from edge_agent.message import Note
from edge_agent.tasks.patterns import _ANY_CASE, _CANONICAL, _EXACT, _UNITS, PatternsTask, extract
from edge_agent.tasks.registry import build_tasks

# (text, assets, codes, measurements as (text, value, unit, quantity, normalized value, normalized unit)).
# Each listed text occurs once in its note, so its expected start is text.index(item).
GOLDEN: list[tuple[str, list[str], list[str], list[tuple[str, float, str, str, float, str]]]] = [
    (
        "P-101 seal leaking, discharge 4.5 bar, motor temp 85 °C, vib 7.1 mm/s, "
        "replaced bearing in 45 min, alarm E-042",
        ["P-101"],
        ["E-042"],
        [
            ("4.5 bar", 4.5, "bar", "pressure", 450.0, "kPa"),
            ("85 °C", 85.0, "degC", "temperature", 85.0, "degC"),
            ("7.1 mm/s", 7.1, "mm/s", "vibration_velocity", 7.1, "mm/s"),
            ("45 min", 45.0, "min", "duration", 2700.0, "s"),
        ],
    ),
    (
        "Pump 3 tripped on high current 32A @ 1450 rpm",
        [],
        [],
        [
            ("32A", 32.0, "A", "current", 32.0, "A"),
            ("1450 rpm", 1450.0, "rpm", "rotational_speed", 1450.0, "rpm"),
        ],
    ),
    (
        "flow dropped to 120 l/min, 480V supply ok, 2h downtime",
        [],
        [],
        [
            ("120 l/min", 120.0, "L/min", "flow", 120.0, "L/min"),
            ("480V", 480.0, "V", "voltage", 480.0, "V"),
            ("2h", 2.0, "h", "duration", 7200.0, "s"),
        ],
    ),
    ("temp 185F", [], [], [("185F", 185.0, "degF", "temperature", 85.0, "degC")]),
    ("press. 60psi", [], [], [("60psi", 60.0, "psi", "pressure", 413.685, "kPa")]),
    ("12 kW", [], [], [("12 kW", 12.0, "kW", "power", 12.0, "kW")]),
    ("1,200 rpm", [], [], [("1,200 rpm", 1200.0, "rpm", "rotational_speed", 1200.0, "rpm")]),
    ("3.5 in/s", [], [], [("3.5 in/s", 3.5, "in/s", "vibration_velocity", 88.9, "mm/s")]),
    (
        "ALM-1023 on CV-17: compressor C-201 at 7.2 barg, 95°C, load 92%, 2 hrs to cool",
        ["CV-17", "C-201"],
        ["ALM-1023"],
        [
            ("7.2 barg", 7.2, "bar", "pressure", 720.0, "kPa"),
            ("95°C", 95.0, "degC", "temperature", 95.0, "degC"),
            ("92%", 92.0, "%", "percent", 92.0, "%"),
            ("2 hrs", 2.0, "h", "duration", 7200.0, "s"),
        ],
    ),
    (
        "outside -5 °C, tank heater 3 kV 12.5 mA, fan FN12 0.8 g at 50 Hz",
        ["FN12"],
        [],
        [
            ("-5 °C", -5.0, "degC", "temperature", -5.0, "degC"),
            ("3 kV", 3.0, "kV", "voltage", 3000.0, "V"),
            ("12.5 mA", 12.5, "mA", "current", 0.0125, "A"),
            ("0.8 g", 0.8, "g", "acceleration", 7.84532, "m/s^2"),
            ("50 Hz", 50.0, "Hz", "frequency", 50.0, "Hz"),
        ],
    ),
    (
        "cooling 3 m³/h (10 gpm on the old skid), 40 lpm bypass, belt 2.5 m/s",
        [],
        [],
        [
            ("3 m³/h", 3.0, "m3/h", "flow", 50.0, "L/min"),
            ("10 gpm", 10.0, "gpm", "flow", 37.8541, "L/min"),
            ("40 lpm", 40.0, "L/min", "flow", 40.0, "L/min"),
            ("2.5 m/s", 2.5, "m/s", "speed", 2.5, "m/s"),
        ],
    ),
    (
        "motor 15 hp / 1.2 MW plant, 250 W lamp; shaft runout 50 µm, gap 1.5 mm",
        [],
        [],
        [
            ("15 hp", 15.0, "hp", "power", 11.1855, "kW"),
            ("1.2 MW", 1.2, "MW", "power", 1200.0, "kW"),
            ("250 W", 250.0, "W", "power", 0.25, "kW"),
            ("50 µm", 50.0, "um", "length", 0.05, "mm"),
            ("1.5 mm", 1.5, "mm", "length", 1.5, "mm"),
        ],
    ),
    (
        "down 30 s, then 1.5 hours, then 3 days; 250 ms response; 5Amps on 24VDC",
        [],
        [],
        [
            ("30 s", 30.0, "s", "duration", 30.0, "s"),
            ("1.5 hours", 1.5, "h", "duration", 5400.0, "s"),
            ("3 days", 3.0, "d", "duration", 259200.0, "s"),
            ("250 ms", 250.0, "ms", "duration", 0.25, "s"),
            ("5Amps", 5.0, "A", "current", 5.0, "A"),
            ("24VDC", 24.0, "V", "voltage", 24.0, "V"),
        ],
    ),
    (
        "log: temp:-12C, P=0.35MPa, 101.3 kPa ambient, cryo 300K, 2,500 mbar",
        [],
        [],
        [
            ("-12C", -12.0, "degC", "temperature", -12.0, "degC"),
            ("0.35MPa", 0.35, "MPa", "pressure", 350.0, "kPa"),
            ("101.3 kPa", 101.3, "kPa", "pressure", 101.3, "kPa"),
            ("300K", 300.0, "K", "temperature", 26.85, "degC"),
            ("2,500 mbar", 2500.0, "mbar", "pressure", 250.0, "kPa"),
        ],
    ),
    # Tricky negatives: nothing here is a measurement.
    ("P-101A leaking again", ["P-101A"], [], []),
    ("V-12 valve stuck", ["V-12"], [], []),
    ("shift starts 8am, break 12:30, inspected 2024-05-01", [], [], []),
    ("Pump 3 ok, no issues, 5 filters replaced, checked 1/2 in fittings", [], [], []),
    ("HX12 m section; rev.5 bar; v2 V; 3x5 bar", ["HX12"], [], []),
    ("temp 85 C and 185 F (spaced single letters are not units)", [], [], []),
    ("bearing at 20K hours, 4,5 bar (decimal comma), 5-10 bar range", [], [], []),
    ("restart 14:30 h, oil:65C", [], [], [("65C", 65.0, "degC", "temperature", 65.0, "degC")]),
    ("ramp 4 bar/s, 5 mins later", [], [], [("5 mins", 5.0, "min", "duration", 300.0, "s")]),
    # A measurement beats an overlapping code: "A 30" is not an alarm here.
    (
        "Line A 30 min stop, ERR 404 raised",
        [],
        ["ERR 404"],
        [("30 min", 30.0, "min", "duration", 1800.0, "s")],
    ),
]


def _check(text: str, out: dict[str, Any]) -> None:
    """The invariants every output must satisfy, whatever the text."""
    assert list(out) == ["assets", "codes", "measurements"]
    json.dumps(out, allow_nan=False)
    spans = []
    for kind in ("assets", "codes", "measurements"):
        starts = [item["start"] for item in out[kind]]
        assert starts == sorted(starts)
        for item in out[kind]:
            assert 0 <= item["start"] < item["end"] <= len(text)
            assert text[item["start"] : item["end"]] == item["text"]
            spans.append((item["start"], item["end"]))
            if kind == "measurements":
                assert list(item) == ["text", "start", "end", "value", "unit", "quantity", "normalized"]
                assert math.isfinite(item["value"]) and isinstance(item["value"], float)
                norm = item["normalized"]
                assert isinstance(norm["value"], float) and math.isfinite(norm["value"])
                assert norm["unit"] == _CANONICAL[item["quantity"]][1]
    spans.sort()
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), "items must not overlap"


@pytest.mark.parametrize(("text", "assets", "codes", "measurements"), GOLDEN, ids=[g[0][:40] for g in GOLDEN])
def test_golden(text: str, assets: list[str], codes: list[str], measurements: list[tuple]) -> None:
    out = extract(text)
    _check(text, out)

    def spans(items: list[str]) -> list[dict[str, Any]]:
        return [{"text": t, "start": text.index(t), "end": text.index(t) + len(t)} for t in items]

    assert out["assets"] == spans(assets)
    assert out["codes"] == spans(codes)
    expected = [
        {**span, "value": v, "unit": u, "quantity": q, "normalized": {"value": nv, "unit": nu}}
        for span, (_, v, u, q, nv, nu) in zip(spans([m[0] for m in measurements]), measurements, strict=True)
    ]
    assert out["measurements"] == expected


def test_exact_offsets() -> None:
    text = "P-101 discharge 4.5 bar, alarm E-042"
    assert extract(text) == {
        "assets": [{"text": "P-101", "start": 0, "end": 5}],
        "codes": [{"text": "E-042", "start": 31, "end": 36}],
        "measurements": [
            {
                "text": "4.5 bar",
                "start": 16,
                "end": 23,
                "value": 4.5,
                "unit": "bar",
                "quantity": "pressure",
                "normalized": {"value": 450.0, "unit": "kPa"},
            }
        ],
    }


def test_offsets_count_code_points_not_bytes() -> None:
    text = "⚠️ مضخة P-77 🔥 at 85 °C ok"
    out = extract(text)
    _check(text, out)
    assert out["assets"] == [{"text": "P-77", "start": 8, "end": 12}]
    assert [m["text"] for m in out["measurements"]] == ["85 °C"]
    assert out["measurements"][0]["start"] == text.index("85 °C")


def test_code_wins_over_asset() -> None:
    out = extract("E-042 then ERR-1234 on P-55")
    assert [c["text"] for c in out["codes"]] == ["E-042", "ERR-1234"]
    assert [a["text"] for a in out["assets"]] == ["P-55"]


def test_normalized_values_are_rounded() -> None:
    [m] = extract("0.1 psi")["measurements"]
    assert m["normalized"]["value"] == 0.689476  # 0.1 * 6.894757293168361, six significant digits
    [m] = extract("-0 °C")["measurements"]
    assert math.copysign(1.0, m["normalized"]["value"]) == 1.0  # no "-0.0" in the JSON


def test_unit_table_is_consistent() -> None:
    spellings = [s for _, _, exact, _ in _UNITS.values() for s in exact]
    spellings += [s.lower() for _, _, _, any_case in _UNITS.values() for s in any_case]
    assert len(spellings) == len(set(spellings)) == len(_EXACT) + len(_ANY_CASE), "a spelling names two units"
    for sym, (_, quantity, exact, any_case) in _UNITS.items():
        assert quantity in _CANONICAL
        for spelling in (*exact, *any_case):
            glued = spelling in ("C", "F", "K")
            [m] = extract(f"x {'7' if glued else '7 '}{spelling}.")["measurements"]
            assert (m["unit"], m["quantity"]) == (sym, quantity), spelling


def test_case_rules() -> None:
    units = {
        t: [m["unit"] for m in extract(t)["measurements"]]
        for t in ["5 BAR", "5 Psi", "5 KW", "5 RPM", "5 mV", "5 MV", "5 mA", "5 MA", "5 ma", "5 Pa", "5 pa"]
    }
    assert units == {
        "5 BAR": ["bar"],
        "5 Psi": ["psi"],
        "5 KW": ["kW"],
        "5 RPM": ["rpm"],
        "5 mV": ["mV"],
        "5 MV": [],
        "5 mA": ["mA"],
        "5 MA": [],
        "5 ma": [],
        "5 Pa": ["Pa"],
        "5 pa": [],
    }


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "\x00\x01\x02 5 bar\x7f",
        "\u202e5 bar\u202c",
        "\u0665 bar",
        "9" * 400 + " bar",
        "." * 1000,
        "-" * 1000 + "5 bar",
        "1," * 5000 + "000 rpm",
        "5 bar " * 20_000,
        "🔥" * 1000,
        "\ud800 5 bar",
    ],
    ids=[
        "empty",
        "space",
        "control",
        "rtl-override",
        "arabic-digit",
        "overflow",
        "dots",
        "dashes",
        "commas",
        "huge",
        "emoji",
        "lone-surrogate",
    ],
)
def test_odd_text_never_raises(text: str) -> None:
    _check(text, extract(text))


def test_overflowing_number_is_dropped() -> None:
    assert extract("9" * 400 + " bar")["measurements"] == []
    [m] = extract("1e3 is not a number but 1" + "0" * 300 + " bar is")["measurements"]
    assert m["normalized"]["value"] == 1e302


TOKENS = [
    "5",
    "-5",
    "1,200",
    "4.5",
    ".5",
    " ",
    "bar",
    "°C",
    "C",
    "F",
    "K",
    "A",
    "rpm",
    "mm/s",
    "P-101",
    "E-042",
    "min",
    "h",
    "%",
    ":",
    "-",
    "/",
    ",",
    ".",
    "²",
    "m/s",
    "l/min",
    "\u2212",
    "\u00a0",
    "x",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(), st.lists(st.one_of(st.sampled_from(TOKENS), st.text(max_size=3))).map("".join)))
def test_property_grounded_and_never_raises(text: str) -> None:
    _check(text, extract(text))


@settings(max_examples=100, deadline=None)
@given(value=st.floats(min_value=-1e9, max_value=1e9, allow_nan=False), unit=st.sampled_from(sorted(_EXACT)))
def test_property_any_written_value_round_trips(value: float, unit: str) -> None:
    number = f"{value:.4f}"
    text = f"reading {number}{unit};" if unit in ("C", "F", "K") else f"reading {number} {unit};"
    [m] = extract(text)["measurements"]
    assert m["value"] == float(number) and m["unit"] == _EXACT[unit]


def test_custom_patterns_and_units_off() -> None:
    cfg = PatternsTaskConfig(
        asset_patterns=(r"\bTK\d+\b", r"\bline \d\b"), code_patterns=(r"\bFLT#\d+\b",), units=False
    )
    task = PatternsTask("custom", cfg)
    text = "TK7 and line 2 raised FLT#17 at 4.5 bar; P-101 E-042"
    [out] = task.process([Note(text=text, topic="t")])
    _check(text, out)
    assert [a["text"] for a in out["assets"]] == ["TK7", "line 2"]
    assert [c["text"] for c in out["codes"]] == ["FLT#17"]
    assert out["measurements"] == []
    assert extract(text, asset_patterns=[re.compile(r"TK\d")], code_patterns=[], units=False) == {
        "assets": [{"text": "TK7", "start": 0, "end": 3}],
        "codes": [],
        "measurements": [],
    }


def test_overlapping_patterns_keep_earliest_longest_and_skip_empty_matches() -> None:
    out = extract("ABC-123", asset_patterns=[r"C-\d+", r"ABC-\d+", r"B", r"x*"], code_patterns=[])
    assert out["assets"] == [{"text": "ABC-123", "start": 0, "end": 7}]


def test_task_batch_order_and_lifecycle() -> None:
    task = PatternsTask("patterns", PatternsTaskConfig())
    assert task.name == "patterns"
    texts = ["5 bar", "", "P-101", "E-042 at 3 A"]
    outs = task.process([Note(text=t, topic="plant/l1/notes") for t in texts])
    assert outs == [extract(t) for t in texts]
    assert task.process([]) == []
    task.close()


def test_build_tasks_uses_patterns_task() -> None:
    from edge_agent.config import parse

    cfg = parse({"routes": [{"topic": "plant/+/notes", "tasks": ["patterns"]}]}, environ={})
    tasks = build_tasks(cfg)
    assert isinstance(tasks["patterns"], PatternsTask)
    assert tasks["patterns"].process([Note(text="60psi", topic="t")])[0]["measurements"][0]["unit"] == "psi"
