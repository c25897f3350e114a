"""The budget service: token and cost budgets, enforced before each provider call."""
