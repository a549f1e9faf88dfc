"""The GPU runbook (`check`: `make gpu-check`), a short GPU rental turned into a record."""
