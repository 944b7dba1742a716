"""The test suite (a package, so helpers and tests import as `tests.<file>` under every pytest import mode).
Naming: see tests/README.md."""
