"""The command-line shell of every entry point: parse, checks, run, one-line errors."""
