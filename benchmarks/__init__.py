"""Speed measurements; each script prints its figures (never asserted in tests)."""
