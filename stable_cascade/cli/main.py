"""``stable-cascade``: the console script. Parses arguments, calls the library, reports errors.

User mistakes (a ``ValueError``, ``TypeError`` or ``OSError`` from the library or the parser) end
with exit code 2 and one ``error: ...`` line on stderr; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

from stable_cascade import __version__
from stable_cascade.cli import batch, demo, generate, models, output, serve, shapes, train, worker

USAGE_ERROR = 2
INTERRUPTED = 130


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``error: ...``) with exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> Parser:
    common = Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser = Parser(
        prog="stable-cascade",
        description="Stable Cascade (Würstchen v3) text-to-image: generate, convert and inspect models.",
        epilog="Run 'stable-cascade COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    generate.add_commands(commands, common)
    batch.add_commands(commands, common)
    models.add_commands(commands, common)
    shapes.add_commands(commands, common)
    train.add_commands(commands, common)
    demo.add_commands(commands, common)
    serve.add_commands(commands, common)
    worker.add_commands(commands, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # OpenMP threads that wait by spinning stall each other once another busy process shares the
    # cores (generation 10-50x slower); waiting passively costs nothing measurable alone. Read when
    # torch loads, which the commands do after this line.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _configure_logging(args.debug)
    try:
        return _handle(args)
    finally:
        output.release()  # names reserved for images that a failure left unwritten


def _handle(args: argparse.Namespace) -> int:
    try:
        return int(args.handler(args))
    except BrokenPipeError:  # the reader went away (e.g. `... | head`): nothing left to say
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED
    except MemoryError as error:
        return _fail(error, args.debug, _OUT_OF_MEMORY)
    except FloatingPointError as error:  # the samplers' NaN guard names the stage and what to try
        return _fail(error, args.debug)
    except (ValueError, TypeError, OSError) as error:
        return _fail(error, args.debug)
    except RuntimeError as error:
        advice = _memory_advice(error)
        if advice is None:
            raise
        return _fail(error, args.debug, advice)


_OUT_OF_MEMORY = "out of memory; try a smaller size or --batch-size, or --offload model"


def _memory_advice(error: RuntimeError) -> str | None:
    """The one line for torch's allocation failures (GPU or CPU), None for other runtime errors."""
    text = str(error)
    if type(error).__name__ == "OutOfMemoryError" or "CUDA out of memory" in text:
        return "out of GPU memory; try --offload model, a smaller size or --batch-size"
    if "DefaultCPUAllocator" in text or "can't allocate memory" in text:
        return _OUT_OF_MEMORY
    return None


def _fail(error: BaseException, debug: bool, message: str | None = None) -> int:
    if debug:
        traceback.print_exc()
    text = message or str(error) or type(error).__name__
    if isinstance(error, OSError) and error.strerror and error.filename:  # raised by the OS
        text = f"{error.filename}: {error.strerror}"
    print(f"error: {' '.join(text.split())}", file=sys.stderr)
    return USAGE_ERROR


def _configure_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LowerCaseLevel("%(levelname)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    if debug:
        logging.getLogger("stable_cascade").setLevel(logging.DEBUG)
        return
    # Their retry and fallback notices would repeat what our one-line error says.
    for library in ("huggingface_hub", "transformers"):
        logging.getLogger(library).setLevel(logging.ERROR)


class _LowerCaseLevel(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace(record.levelname, record.levelname.lower(), 1)


if __name__ == "__main__":
    sys.exit(main())
