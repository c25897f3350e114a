"""The supervisor: OTP supervision for agents. For now the pure core (no I/O):
restart intensity, strategy decisions, and the per-supervisor state they act on."""
