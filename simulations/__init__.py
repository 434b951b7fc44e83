"""Ready federation specs (TOML), installed as the package data fedpeft.simulations."""
