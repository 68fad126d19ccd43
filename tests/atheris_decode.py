"""Coverage-guided fuzzing of decode() with atheris (libFuzzer); tests/test_fuzz.py runs it briefly.

By hand, for longer: `python tests/atheris_decode.py -runs=1000000 -seed=1`.
The property: decode() returns publishable text or raises DecodeError with a reason, nothing else.
"""

import sys

import atheris

with atheris.instrument_imports(include=["edge_agent"]):
    from edge_agent.decode import decode
    from edge_agent.errors import DecodeError


def one_input(data: bytes) -> None:
    try:
        text, input_id = decode(data, id_field="id", max_bytes=4096, max_depth=8)
    except DecodeError as e:
        assert e.reason
        return
    assert text.strip()
    text.encode("utf-8")
    assert input_id is None or isinstance(input_id, str)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
