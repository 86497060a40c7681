"""The ``stable-cascade`` command line: argument parsing and output only; the work is the library's."""
