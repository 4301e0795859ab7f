"""Cache tiers: exact (hash of the canonical request) and, later, semantic."""
