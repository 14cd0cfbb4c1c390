# pytest setup for the Python module's tests: no bytecode in the source tree, and a readable
# failure when the module was not built (PYTHONPATH must name <build>/python; ctest sets it).
import sys

sys.dont_write_bytecode = True

try:
    import moe_runtime  # noqa: F401
except ImportError as exc:  # pragma: no cover
    raise SystemExit(f"moe_runtime is not importable ({exc}): build it and set PYTHONPATH=<build>/python")
