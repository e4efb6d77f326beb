"""Tabular policies, exact population losses and closed-form optima for checking objectives."""
