"""The `tinygraft` command: one file per command, flags and printing only (the work is in train/, infer/ and
analysis/). main.py builds the parser and is the one place errors become exit codes."""
