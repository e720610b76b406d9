"""The kdcache cache format: manifest, parts, the Zarr v3 and Arrow backends, integrity."""
