"""Differential privacy: DP-SGD local training (Opacus) and per-client accounting."""

from fedpeft.privacy.accounting import ClientBudget, calibrate_sigma, epsilon, plan_budgets, sample_rate

__all__ = ["ClientBudget", "calibrate_sigma", "epsilon", "plan_budgets", "sample_rate"]
