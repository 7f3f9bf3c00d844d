"""What requirements.txt installs, asked for before anything imports it: a script run outside the project's virtual
environment says so in one line, instead of a traceback (common/__init__.py imports this first, and each tool imports
common before its other packages)."""

import importlib.util

for name in ("kafka", "pydantic", "rich", "opentelemetry", "prometheus_client", "zstandard", "msgspec", "starlette",
             "uvicorn"):
    if importlib.util.find_spec(name) is None:
        raise SystemExit(f"{name} is not installed here: run the scripts in the project's virtual environment "
                         f"(`make check` makes it in .venv; then `. .venv/bin/activate`)")
