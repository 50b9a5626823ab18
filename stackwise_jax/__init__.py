"""StackWise-JAX."""
