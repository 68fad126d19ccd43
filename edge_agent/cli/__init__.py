"""The `edge-agent` command: `main` builds the parser, one module per command group adds its commands."""
