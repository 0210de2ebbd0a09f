"""Layer 0: what every layer may use: the error family and atomic file writes."""
