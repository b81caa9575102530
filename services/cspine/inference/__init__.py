"""Model contracts (specs), the Triton client and the local Triton launcher."""
