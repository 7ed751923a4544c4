"""Test helpers shared by the runtime and integration tests (tiny real bundles, fixtures)."""
