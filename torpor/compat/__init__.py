"""Front doors that speak another platform's API over the engine (`e2b/`: E2B's)."""
