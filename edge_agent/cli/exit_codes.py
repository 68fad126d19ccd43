"""The one error → exit-code policy, for every command.

0 done; 2 what the command was given is wrong (the config: field and fix, an input file, an examples row);
1 the work failed (a model that does not load, an outbox that cannot be read, a refused purge).
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable

from ..errors import ConfigError, EdgeAgentError, InputError

Command = Callable[[argparse.Namespace], int]


def fail_config(e: ConfigError) -> int:
    print(f"edge-agent: invalid config: {e.field}: {e.message}", file=sys.stderr)
    if e.hint:
        print(f"  fix: {e.hint}", file=sys.stderr)
    return 2


def guarded(command: Command) -> Command:
    """`command` under the policy: the errors edge-agent raises on purpose become a message and an exit code."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return int(command(args))
        except ConfigError as e:
            return fail_config(e)
        except (InputError, OSError) as e:  # OSError: a file the command was pointed at
            print(f"edge-agent: {e}", file=sys.stderr)
            return 2
        except EdgeAgentError as e:
            print(f"edge-agent: {e}", file=sys.stderr)
            return 1

    return run
