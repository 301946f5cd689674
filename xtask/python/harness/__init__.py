"""What the parity harness's Python scripts share (the Rust side's counterpart is the
hook-parity crate): one way to flatten a cache into `key/sub/...` -> tensor entries."""
from .flatten import flat_cache, flatten

__all__ = ["flat_cache", "flatten"]
