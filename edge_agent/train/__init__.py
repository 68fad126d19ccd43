"""Training heads and fine-tuning encoders (workstation and CLI only; never imported by the run path)."""
