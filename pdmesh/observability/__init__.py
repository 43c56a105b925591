"""What an operator sees of a running mesh: Prometheus metrics, OpenTelemetry traces."""
