"""Test helpers: reference implementations (torch DOLG, revisitop's compute_map), training-run
helpers and repository paths. Imported as `from tests.helpers import ...`; never by the package."""
