"""The tasks a route runs: the contract (base), the registry (kind -> class) and one module per kind."""
