#!/usr/bin/env python3
"""The catalogue of every error the golden tests provoke, with its SQLSTATE.

Run by `make errors`: it runs the golden tests (`make test-regress`) with the server
logging each error's SQLSTATE (log_line_prefix %e), then collects
  - every uncaught ERROR from the server log of that run, and
  - every error the tests catch and print as 'SQLSTATE: message' (security.sql's helper),
and prints one Markdown row per distinct (SQLSTATE, message), messages with file paths
and numbers as the tests gave them. The README's "Errors tested" table is this output.
"""
import re
import sys

log_path, start = sys.argv[1], int(sys.argv[2])
outs = sys.argv[3:]
rows = set()
with open(log_path, "rb") as f:
    f.seek(start)
    for raw in f.read().decode("utf-8", "replace").splitlines():
        m = re.search(r"\] ([0-9A-Z]{5}) ERROR:  (.*)$", raw)
        if m and m.group(1) != "00000":
            rows.add((m.group(1), m.group(2).strip()))
for p in outs:
    for line in open(p, encoding="utf-8"):
        m = re.match(r"^\s*([0-9][0-9A-Z]{4}): (.+?)\s*\|?\s*$", line)
        if m and not m.group(2).startswith("ok"):
            rows.add((m.group(1), m.group(2).strip().rstrip("|").strip()))
names = {
    "08001": "sqlclient_unable_to_establish_sqlconnection", "39P01": "trigger_protocol_violated",
    "53400": "configuration_limit_exceeded", "55000": "object_not_in_prerequisite_state",
    "22000": "data_exception", "22004": "null_value_not_allowed", "22023": "invalid_parameter_value",
    "2202E": "array_element_error", "22P02": "invalid_text_representation", "22P04": "bad_copy_file_format",
    "3F000": "invalid_schema_name", "42501": "insufficient_privilege", "42601": "syntax_error",
    "42602": "invalid_name", "42703": "undefined_column", "42704": "undefined_object",
    "42710": "duplicate_object", "42804": "datatype_mismatch", "42883": "undefined_function",
    "42P01": "undefined_table", "42P07": "duplicate_table", "54000": "program_limit_exceeded",
    "57014": "query_canceled", "58P01": "undefined_file", "XX000": "internal_error",
    "22003": "numeric_value_out_of_range", "0A000": "feature_not_supported",
}
print(f"{len(rows)} distinct errors\n")
print("| SQLSTATE | error |")
print("|---|---|")
for code, msg in sorted(rows):
    msg = msg.replace("|", "\\|")
    print(f"| `{code}` {names.get(code, '')} | {msg} |")
