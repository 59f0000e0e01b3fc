"""Real multi-process Flower deployments: TLS certificates and node keys, process management, run-status polling."""
