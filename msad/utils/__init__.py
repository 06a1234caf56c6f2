"""What every layer of msad may use: atomic file writes, the environment summary."""
