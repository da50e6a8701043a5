"""absl experiment binaries and the benchmark record format."""
