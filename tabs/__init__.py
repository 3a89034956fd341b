"""One module per tab; each exposes build(ctx) and only wires events."""
