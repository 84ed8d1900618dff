"""``make bench``: every performance target of DESIGN.md, measured side by side with its
baseline in the same run (see ``python -m bench --help``)."""
