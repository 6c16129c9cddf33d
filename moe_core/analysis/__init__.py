"""Analyses of trained models: the mechanism behind equifinality (spec sections 4.3-4.8)."""
