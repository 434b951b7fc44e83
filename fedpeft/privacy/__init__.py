"""Differential privacy: DP-SGD local training (Opacus) and per-client accounting."""

from fedpeft.privacy.accounting import ClientBudget, calibrate_budget, calibrate_sigma, epsilon, sample_rate

__all__ = ["ClientBudget", "calibrate_budget", "calibrate_sigma", "epsilon", "sample_rate"]
